"""TEMPORARY stand-ins for chat_format's training functions of s13-hf (same names and signatures), so the trainer
runs before they land. Delete once `app.backends.chat_format.training_ids` exists (train._formats picks it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.backends import chat_format
from app.toolplan import plan_tools
from app.wire import Message


@dataclass(frozen=True)
class PromptFormat:
    family: str
    end_of_turn: str


def prompt_format_for(target: str) -> PromptFormat:
    return PromptFormat("gemma", "<end_of_turn>") if "gemma" in target else PromptFormat("chatml", "<|im_end|>")


def training_text(fmt: PromptFormat, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  answer_message: dict[str, Any]) -> tuple[str, str]:
    msgs = [Message.model_validate(m) for m in messages]
    functions = plan_tools(tools, None, None).functions if tools else []
    prompt = chat_format.render_prompt(msgs, functions, fmt.family)
    completion = chat_format.assistant_text(Message.model_validate(answer_message)) + fmt.end_of_turn
    return prompt, completion


def training_ids(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return p + c, [0] * len(p) + [1] * len(c)
