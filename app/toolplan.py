"""The one reading of a request's `tools`, `tool_choice` and `parallel_tool_calls`: a ToolPlan.

Grammars (what a local model may write), validation (what a call may be) and the LangChain adapter (what a
`bind_tools(tool_choice=...)` means) all take their answer from here, so they cannot disagree. OpenAI's forms:

    "none" | "auto" | "required"
    {"type": "function", "function": {"name": "f"}}                                  named: exactly one call of f
    {"type": "allowed_tools", "allowed_tools": {"mode": "auto" | "required",
                                                "tools": [{"type": "function", "function": {"name": "f"}}]}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app.errors import UsageError

ToolMode = Literal["none", "auto", "required", "named"]
CHOICE_FORMS = ("'none', 'auto', 'required', {\"type\": \"function\", \"function\": {\"name\": ...}} or "
                "{\"type\": \"allowed_tools\", \"allowed_tools\": {\"mode\": \"auto\"|\"required\", \"tools\": [...]}}")


@dataclass(frozen=True)
class ToolPlan:
    """What the model may do with the request's tools.

    `functions` are the OpenAI `function` dicts it may call (all offered ones, or the allowed/named subset);
    `offered` are the names the request listed at all, so a call outside `functions` can be told apart from a
    call of a function that does not exist.
    """

    mode: ToolMode = "none"
    functions: list[dict[str, Any]] = field(default_factory=list)
    parallel: bool = True
    offered: tuple[str, ...] = ()

    @property
    def forced(self) -> str | None:
        """The one function a named tool_choice forces."""
        return self.functions[0]["name"] if self.mode == "named" else None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f["name"] for f in self.functions)


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any = None,
               parallel_tool_calls: bool | None = None) -> ToolPlan:
    """Read tools (OpenAI tool dicts), tool_choice and parallel_tool_calls the way OpenAI does.

    >>> f = {"type": "function", "function": {"name": "f", "parameters": {}}}
    >>> plan_tools([f]).mode, plan_tools([f], "none").mode, plan_tools([f], {"type": "function", "function": {"name": "f"}}).forced
    ('auto', 'none', 'f')
    """
    functions = [_function(t) for t in tools or []]
    offered = tuple(f["name"] for f in functions)
    choice = "auto" if tool_choice is None else tool_choice
    mode, allowed = _read_choice(choice)
    if not functions or mode == "none":
        return ToolPlan(offered=offered)
    parallel = parallel_tool_calls is not False
    if allowed is None:
        return ToolPlan(mode=mode, functions=functions, parallel=parallel, offered=offered)
    chosen = [f for f in functions if f["name"] in allowed]
    missing = [name for name in allowed if name not in offered]
    if missing:
        raise UsageError(f"tool_choice names {', '.join(map(repr, missing))}, which is not in tools "
                         f"({', '.join(offered)}); name one of those")
    if mode == "named":
        return ToolPlan(mode="named", functions=chosen, parallel=False, offered=offered)
    return ToolPlan(mode=mode, functions=chosen, parallel=parallel, offered=offered)


def request_plan(req: Any) -> ToolPlan:
    """The plan of a ChatRequest."""
    return plan_tools(req.tool_dicts(), req.tool_choice, req.parallel_tool_calls)


def from_langchain(choice: Any) -> str | dict[str, Any]:
    """LangChain's `bind_tools(tool_choice=...)` spellings as OpenAI's: "any"/True mean required, a bare name
    means that function."""
    if isinstance(choice, dict) or choice in ("auto", "none", "required"):
        return choice
    if choice in ("any", True):
        return "required"
    if isinstance(choice, str) and choice:
        return {"type": "function", "function": {"name": choice}}
    raise UsageError(f"tool_choice {choice!r} is not understood; use {CHOICE_FORMS}, 'any' or a function name")


def _function(tool: Any) -> dict[str, Any]:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None  # a bare function dict is read too
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise UsageError(f'each tool must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}; '
                         f"got {str(tool)[:120]}")
    return fn


def _read_choice(choice: Any) -> tuple[ToolMode, list[str] | None]:
    """(mode, the names it restricts calls to, or None for all)."""
    if choice in ("none", "auto", "required"):
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        spec = choice.get("allowed_tools") if isinstance(choice.get("allowed_tools"), dict) else choice
        mode, tools = spec.get("mode", "auto"), spec.get("tools")
        if mode in ("auto", "required") and isinstance(tools, list) and tools:
            return mode, [_choice_name(t) for t in tools]
    elif isinstance(choice, dict) and choice.get("type", "function") == "function":
        return "named", [_choice_name(choice)]
    raise UsageError(f"tool_choice {choice!r} is not understood; use {CHOICE_FORMS}")


def _choice_name(entry: Any) -> str:
    fn = entry.get("function") if isinstance(entry, dict) else None
    name = (fn if isinstance(fn, dict) else entry if isinstance(entry, dict) else {}).get("name")
    if not isinstance(name, str) or not name:
        raise UsageError(f"tool_choice entry {entry!r} names no function; use {{\"type\": \"function\", "
                         f"\"function\": {{\"name\": ...}}}}")
    return name
