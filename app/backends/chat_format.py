"""Chat messages to a local model's prompt text, and its tool-call output back to OpenAI tool calls.

Two prompt families: ChatML (SmolLM2's GGUF template) and Gemma turns (Gemma-3-270M is a base model whose GGUF
carries no template, so its turns are written here, system folded into the first user turn). Tools, calls and
results are written and read by the one Hermes codec, `app/hermes.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from app import hermes
from app.wire import Message, ToolCall

Family = Literal["chatml", "gemma"]

CHATML_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # from the GGUF template


@dataclass(frozen=True)
class Turn:
    role: Literal["system", "user", "assistant"]
    text: str


def family_of(metadata: dict[str, str]) -> Family:
    """The prompt family for a GGUF file's metadata (gemma architectures get Gemma turns, the rest ChatML)."""
    arch = metadata.get("general.architecture", "")
    template = metadata.get("tokenizer.chat_template", "")
    return "gemma" if arch.startswith("gemma") or "<start_of_turn>" in template else "chatml"


def render_prompt(messages: list[Message], functions: list[dict[str, Any]], family: Family) -> str:
    """The full prompt text, ending where the assistant's reply begins.

    >>> render_prompt([Message(role="user", content="hi")], [], "chatml").endswith("<|im_start|>assistant\\n")
    True
    """
    turns = to_turns(messages, functions)
    return render_gemma(turns) if family == "gemma" else render_chatml(turns)


def to_turns(messages: list[Message], functions: list[dict[str, Any]]) -> list[Turn]:
    """OpenAI messages as plain turns: one system turn first (with the tool prompt), calls and results as text."""
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer"))
    # A template that places the tool list itself (its `{{tools}}` variable, filled with this same text) keeps it
    # where it put it, so rules can follow the list; otherwise the list closes the system turn.
    if functions and hermes.tools_prompt(functions) not in system:
        system = "\n\n".join(p for p in (system, hermes.tools_prompt(functions)) if p)
    turns = [Turn("system", system)] if system else []
    for msg in messages:
        if msg.role == "tool":
            _add_tool_result(turns, msg)
        elif msg.role in ("user", "assistant"):
            turns.append(Turn(msg.role, assistant_text(msg) if msg.role == "assistant" else msg.text()))
    return turns


def assistant_text(msg: Message) -> str:
    return hermes.assistant_text(msg.text(), [(c.function.name, c.function.arguments) for c in msg.tool_calls or []])


def _add_tool_result(turns: list[Turn], msg: Message) -> None:
    # Consecutive tool results share one user turn, as Hermes/Qwen-style templates render them.
    block = hermes.tool_response(msg.text())
    last = turns[-1] if turns else None
    if last and last.role == "user" and last.text.startswith(hermes.RESPONSE_OPEN):
        turns[-1] = Turn("user", f"{last.text}\n{block}")
    else:
        turns.append(Turn("user", block))


def render_chatml(turns: list[Turn]) -> str:
    if not turns or turns[0].role != "system":
        turns = [Turn("system", CHATML_DEFAULT_SYSTEM), *turns]
    body = "".join(f"<|im_start|>{t.role}\n{t.text}<|im_end|>\n" for t in turns)
    return body + "<|im_start|>assistant\n"


def render_gemma(turns: list[Turn]) -> str:
    system = turns[0].text if turns and turns[0].role == "system" else ""
    rest = turns[1:] if system else turns
    if system and rest and rest[0].role == "user":
        rest = [Turn("user", f"{system}\n\n{rest[0].text}"), *rest[1:]]
    elif system:
        rest = [Turn("user", system), *rest]
    roles = {"assistant": "model", "user": "user"}
    body = "".join(f"<start_of_turn>{roles[t.role]}\n{t.text}<end_of_turn>\n" for t in rest)
    return body + "<start_of_turn>model\n"


# ---- output ----------------------------------------------------------------------------------------------

def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split model output into (content, OpenAI tool calls) with the Hermes codec (`hermes.split_output`).

    >>> content, calls = parse_tool_calls('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    >>> content, calls[0].function.name, calls[0].function.arguments
    (None, 'f', '{"x": 1}')
    """
    content, calls = hermes.split_output(text)
    return content, hermes.to_tool_calls(calls)


def held_back(text: str, markers: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a marker, and so must not be streamed yet.

    >>> held_back("Sure <tool", ["<tool_call>"])
    5
    """
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest
