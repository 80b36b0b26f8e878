"""The Hermes function-calling format, written and read in one place: for prompts, outputs and training data.

Tools are listed as JSON inside `<tools></tools>` in the system prompt, a call is
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, a result comes back inside `<tool_response>`.
The local backends render prompts with it and parse their models' output with it, validation reads text calls
with it, and dataset writers serialise assistant turns with it, so a model is trained on what it is served.

Reading is lenient in the ways models actually write the format: "parameters" for "arguments", arguments as a
JSON string, a list of calls in one block, `<tool_call name="f">{...arguments...}</tool_call>`, and a last block
left unclosed (a stop sequence often eats `</tool_call>`). What it cannot read raises FormatError with one
error type of the taxonomy (`app/validation.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from app.wire import FunctionCall, ToolCall

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

TOOLS_PROMPT = """# Tools

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
class ParsedCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


class FormatError(Exception):
    """Output that tries to be a call (or JSON) and fails; `error_type` is one of validation.ERROR_TYPES."""

    def __init__(self, error_type: str, detail: str, calls: tuple[ParsedCall, ...] = (), value: Any = None):
        super().__init__(detail)
        self.error_type, self.detail, self.calls, self.value = error_type, detail, calls, value


# ---- writing ---------------------------------------------------------------------------------------------

def tools_prompt(functions: list[dict[str, Any]]) -> str:
    """The system-prompt section that lists `functions` (OpenAI `function` dicts)."""
    listed = "\n".join(json.dumps({"type": "function", "function": f}) for f in functions)
    return TOOLS_PROMPT.format(tools=listed)


# The one rule of where the tool list stands in a system prompt. A template's `{{tools}}` (prompts/store.py fills
# it) stands for exactly `tools_section(functions)`, `functions` being what the request lets the model call
# (`app.toolplan.plan_tools(tools, tool_choice).functions`); a local backend (backends/chat_format.py, llama.cpp
# and hf, serving and training text alike) writes the list only into a system prompt that does not hold that
# section already, and then last. So a template places the list where its `{{tools}}` stands, a template without
# one (or one rendered without the request's tools, as the graph's prompt node renders it) gets it at the end,
# and no prompt lists its tools twice.

def tools_section(functions: list[dict[str, Any]]) -> str:
    """What `{{tools}}` expands to: the tool section of `functions`, empty when there are none."""
    return tools_prompt(functions) if functions else ""


def holds_tools(system: str, functions: list[dict[str, Any]]) -> bool:
    """Whether a system prompt already lists `functions` (its `{{tools}}` was filled with them)."""
    return bool(functions) and tools_prompt(functions) in system


def system_with_tools(system: str, functions: list[dict[str, Any]]) -> str:
    """The system text a local model reads: `system` as it is when it holds the tool section or there are no
    tools, else with the section appended (after a blank line)."""
    if not functions or holds_tools(system, functions):
        return system
    return "\n\n".join(p for p in (system, tools_prompt(functions)) if p)


def format_call(name: str, arguments: Any) -> str:
    """One call as the model writes it; `arguments` may be a JSON string (as OpenAI sends it) or data.

    >>> format_call("f", '{"x": 1}')
    '<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>'
    """
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            pass  # an invalid earlier call is shown as the model wrote it
    return f"{TOOL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{TOOL_CLOSE}"


def assistant_text(content: str | None, calls: list[tuple[str, Any]]) -> str:
    """An assistant turn as the model writes it: its text, then each (name, arguments) call on its own lines."""
    return "\n".join(p for p in (content or "", *(format_call(n, a) for n, a in calls)) if p)


def tool_response(text: str) -> str:
    return f"{RESPONSE_OPEN}\n{text}\n{RESPONSE_CLOSE}"


# ---- reading ---------------------------------------------------------------------------------------------

_SELF_CLOSING = re.compile(r"<tool_call\b[^<>]*/>", re.I)
# A block ends at its closing tag, at the next opening tag, or at the end (a stop sequence ate the close).
_BLOCK = re.compile(r"<tool_call\b(?P<attrs>[^<>]*)>(?P<body>.*?)(?:</tool_call\s*>|(?=<tool_call\b)|\Z)", re.I | re.S)
_NAME_ATTR = re.compile(r"""\bname\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>/]+))""")


def read_calls(text: str) -> tuple[ParsedCall, ...] | None:
    """The calls written in `text` as `<tool_call>` blocks; None when it has no block. Raises FormatError on a
    block that does not parse."""
    if m := _SELF_CLOSING.search(text):
        raise FormatError("self_closing_tag", f"{m.group(0)} holds no arguments; write <tool_call>{{...}}</tool_call>")
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        return None
    return tuple(call for b in blocks for call in _parse_block(b.group("attrs"), b.group("body")))


def split_output(text: str) -> tuple[str | None, list[ParsedCall]]:
    """A model's raw output as (content, calls), what a backend returns as OpenAI `tool_calls`.

    Content is the text before the first call (None when empty). When the blocks do not parse, the whole text
    is content with no calls, so validation downstream sees exactly what the model wrote.

    >>> split_output('Sure. <tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    ('Sure.', [ParsedCall(name='f', arguments={'x': 1})])
    """
    try:
        calls = read_calls(text)
    except FormatError:
        return text, []
    if not calls:
        return text, []
    start = _BLOCK.search(text).start()  # type: ignore[union-attr]
    return text[:start].strip() or None, list(calls)


def to_tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    """Parsed calls as OpenAI `tool_calls` (arguments as a JSON string, a fresh id each)."""
    return [ToolCall(function=FunctionCall(name=c.name, arguments=json.dumps(c.arguments))) for c in calls]


def _parse_block(attrs: str, body: str) -> list[ParsedCall]:
    if m := _NAME_ATTR.search(attrs):
        name = next(g for g in m.groups() if g is not None)
        return [ParsedCall(name, arguments(body, name))]
    if not body.strip():
        raise FormatError("invalid_json", 'an empty <tool_call> block; write {"name": ..., "arguments": {...}} in it')
    value = load_json(body, "the <tool_call> body")
    return [_call_from_object(item) for item in (value if isinstance(value, list) else [value])]


def _call_from_object(obj: Any) -> ParsedCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise FormatError("invalid_json", 'a <tool_call> body must be {"name": ..., "arguments": {...}}')
    return ParsedCall(obj["name"], arguments(obj.get("arguments", obj.get("parameters")), obj["name"]))


def arguments(raw: Any, name: str) -> dict[str, Any]:
    """A call's arguments as a dict, from a JSON string or data; empty means none."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    value = load_json(raw, f"the arguments of {name}") if isinstance(raw, str) else raw
    if not isinstance(value, dict):
        raise FormatError("invalid_json", f"the arguments of {name} must be a JSON object, got {kind_of(value)}")
    return value


# ---- JSON as models write it -----------------------------------------------------------------------------

def load_json(text: str, what: str) -> Any:
    """Parse JSON or name the near miss: a code fence, prose around valid JSON, or broken JSON."""
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as exc:
        if "```" in stripped:
            raise FormatError("markdown_fence", f"{what} is wrapped in a ``` code fence; send bare JSON") from None
        if (prose := _prose_around(stripped)) is not None:
            raise FormatError("prose_around_json", f"{what} has text around its JSON: {prose[:60]!r}") from None
        raise FormatError("invalid_json", f"{what} is not valid JSON: {exc.msg} at char {exc.pos}") from None


def _is_container(value: Any) -> bool:
    return isinstance(value, (dict, list))


def find_json(text: str, want=_is_container) -> tuple[int, int, Any] | None:
    """The first JSON object or array embedded in text that `want` accepts, as (start, end, value)."""
    decoder = json.JSONDecoder()
    for match in list(re.finditer(r"[{\[]", text))[:200]:
        try:
            value, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if want(value):
            return match.start(), end, value
    return None


def _prose_around(text: str) -> str | None:
    """The words around valid JSON embedded in text; None when the text is only broken JSON (an inner object
    of a broken outer one parses too, hence: no "{" before it, and letters outside it)."""
    found = find_json(text)
    if found is None:
        return None
    start, end, _ = found
    outside = (text[:start] + " " + text[end:]).strip()
    return outside if "{" not in text[:start] and re.search(r"[A-Za-z]", outside) else None


def kind_of(value: Any) -> str:
    """The JSON type name of a Python value."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
