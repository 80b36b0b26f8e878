"""TEMPORARY stand-ins for H1's app/backends/hf_load.py and chat_format's training functions (same names and
signatures), so the trainer runs before s13-hf is merged. Delete once `app.backends.hf_load` exists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.backends import chat_format
from app.toolplan import plan_tools
from app.wire import Message


@dataclass(frozen=True)
class PromptFormat:
    family: str
    end_of_turn: str


def load_base(target: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.local_models import ALIASES, resolve_model

    path = resolve_model(target) if target in ALIASES or target.endswith(".gguf") else Path(target)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    root = path.parent if kw else path
    model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, **kw)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.to("cpu" if device == "auto" else device), AutoTokenizer.from_pretrained(root, **kw)


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
