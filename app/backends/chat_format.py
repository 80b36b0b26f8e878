"""Chat messages to a local model's prompt text, and its Hermes-style tool-call output back to OpenAI tool calls.

Two prompt families: ChatML (SmolLM2's GGUF template) and Gemma turns (Gemma-3-270M is a base model whose GGUF
carries no template, so its turns are written here, system folded into the first user turn). Tools follow the
Hermes function-calling convention: listed as JSON inside `<tools></tools>` in the system prompt, called as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, answered inside `<tool_response>` in a user turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from app.wire import FunctionCall, Message, ToolCall

Family = Literal["chatml", "gemma"]
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

CHATML_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # from the GGUF template

HERMES_TOOLS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


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
    if functions:
        system = "\n\n".join(p for p in (system, tools_prompt(functions)) if p)
    turns = [Turn("system", system)] if system else []
    for msg in messages:
        if msg.role == "tool":
            _add_tool_result(turns, msg)
        elif msg.role in ("user", "assistant"):
            turns.append(Turn(msg.role, assistant_text(msg) if msg.role == "assistant" else msg.text()))
    return turns


def tools_prompt(functions: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps({"type": "function", "function": f}) for f in functions)
    return HERMES_TOOLS.format(tools=listed)


def format_tool_call(name: str, arguments: Any) -> str:
    """One call as the model writes it; `arguments` may be a JSON string (as OpenAI sends it) or data."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            pass  # an invalid earlier call is shown as the model wrote it
    return f"{TOOL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{TOOL_CLOSE}"


def assistant_text(msg: Message) -> str:
    calls = [format_tool_call(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    return "\n".join(p for p in (msg.text(), *calls) if p)


def _add_tool_result(turns: list[Turn], msg: Message) -> None:
    # Consecutive tool results share one user turn, as Hermes/Qwen-style templates render them.
    block = f"<tool_response>\n{msg.text()}\n</tool_response>"
    last = turns[-1] if turns else None
    if last and last.role == "user" and last.text.startswith("<tool_response>"):
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

_CALL_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CLOSE), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split model output into (content, tool calls).

    Content is the text before the first call (None when empty). If any call block does not parse, the whole
    output is returned as content with no calls, so validation downstream sees exactly what the model wrote.

    >>> content, calls = parse_tool_calls('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    >>> content, calls[0].function.name, calls[0].function.arguments
    (None, 'f', '{"x": 1}')
    """
    start = text.find(TOOL_OPEN)
    if start < 0:
        return text, []
    calls = [_to_call(block) for block in _CALL_BLOCK.findall(text, start)]
    if not calls or any(c is None for c in calls) or _has_unclosed_call(text, start):
        return text, []
    return text[:start].strip() or None, calls  # type: ignore[return-value]


def _to_call(block: str) -> ToolCall | None:
    try:
        data = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    return ToolCall(function=FunctionCall(name=data["name"], arguments=json.dumps(arguments)))


def _has_unclosed_call(text: str, start: int) -> bool:
    tail = _CALL_BLOCK.sub("", text[start:])
    return TOOL_OPEN in tail


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
