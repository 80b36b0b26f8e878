"""Evaluation suites: a suite string (`bfcl:<category>`, `captured:<agent>`, `jsonl:<path>`, `workflow:<path>`)
turned into plain EvalItems, each with what to send and what to score against; all loading and checking happens
here, before any model is called.

Splits that matter for later issues:
- BFCL `simple_python` items 300-399 are held out: the training issue reports on them; never tune prompts there.
- A captured call is held out when the first 8 hex digits of sha256(call id) mod 100 fall below HELD_OUT_PERCENT
  (`is_held_out`): stable across machines and store order. `captured:<agent>` evaluates on the held-out calls
  only, and dataset building must skip them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from app.config import decode_utf8
from app.holdout import HELD_OUT_PERCENT, is_held_out  # noqa: F401 (re-exported: the one rule lives in app/)
from app.errors import UsageError
from app.validation import ParsedCall
from app.wire import Message, Tool

SUITE_KINDS = ("bfcl:<category>", "captured:<agent>", "jsonl:<path>", "workflow:<path>")
BFCL_HELD_OUT = {"simple_python": range(300, 400)}
# In these categories the question is whether to call at all, so the model must be free not to.
BFCL_WHETHER_TO_CALL = ("irrelevance", "live_irrelevance", "live_relevance")

# What an item is scored as: "bfcl" (BFCL's AST rule), "calls" (exact_match/arg_f1 on tool calls), "json"
# (normalised value / json_f1), "text" (whitespace-normalised equality) or "workflow" (routing and answer check).
ItemKind = Literal["bfcl", "calls", "json", "text", "workflow"]


@dataclass(frozen=True)
class EvalItem:
    """One thing to ask and its reference. `expected` by kind: bfcl → BFCL's possible_answer; calls → a list of
    ParsedCall; json → any JSON value; text → a string; workflow → {"agents": [...], "check": {...}}."""

    id: str
    kind: ItemKind
    expected: Any
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    functions: list[dict[str, Any]] = field(default_factory=list)  # BFCL signatures, for bfcl_match
    category: str | None = None  # BFCL category
    query: str = ""  # workflow items


@dataclass(frozen=True)
class Suite:
    name: str
    kind: str  # bfcl | captured | jsonl | workflow
    items: list[EvalItem]
    notes: list[str] = field(default_factory=list)


def split_suite(spec: str) -> tuple[str, str]:
    """`kind:argument`, checked against the four suite kinds."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg or f"{kind}:" not in "".join(SUITE_KINDS):
        raise UsageError(f"unknown suite {spec!r}; use one of: {', '.join(SUITE_KINDS)} "
                         "(e.g. bfcl:simple_python)")
    return kind, arg


def load_suite(spec: str, *, offset: int = 0, limit: int | None = None, store: Any = None,
               settings: Any = None) -> Suite:
    """Load and check every item of a suite, then keep items[offset:offset+limit].

    `store` and `settings` are needed by `captured:` only (the calls, and which binding is each route's teacher).

    >>> load_suite("bfcl:simple_python", limit=2).items[1].id
    'simple_python_1'
    """
    check_window(offset, limit)
    kind, arg = split_suite(spec)
    if kind == "bfcl":
        items, notes = _bfcl_items(arg), _bfcl_notes(arg, offset, limit)
    elif kind == "captured":
        items, notes = _captured_items(arg, store, settings), [_CAPTURED_NOTE]
    elif kind == "jsonl":
        items, notes = _jsonl_items(Path(arg)), []
    else:
        items, notes = _workflow_items(Path(arg)), []
    window = items[offset: None if limit is None else offset + limit]
    if not window:
        raise UsageError(f"suite {spec!r} has {len(items)} items, none from offset {offset}; lower --offset")
    return Suite(spec, kind, window, notes)


def check_window(offset: int, limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}; leave it out to run every item")
    if offset < 0:
        raise UsageError(f"--offset must be 0 or more, got {offset}")


# ---- bfcl ------------------------------------------------------------------------------------------------

def _bfcl_items(category: str) -> list[EvalItem]:
    from training.bfcl import load_category, to_openai_tools

    loaded = load_category(category)  # an unknown category raises, listing the real ones
    if loaded and loaded[0].language != "python":
        raise UsageError(f"bfcl:{category} is scored with BFCL's Python rule only; pick a Python category "
                         "(simple_python, multiple, parallel, live_simple, irrelevance, ...)")
    choice = "auto" if category in BFCL_WHETHER_TO_CALL else "required"
    parallel = None if "parallel" in category else False
    return [EvalItem(id=b.id, kind="bfcl", expected=b.possible_answer, messages=b.messages,
                     tools=to_openai_tools(b.functions), tool_choice=choice, parallel_tool_calls=parallel,
                     functions=b.functions, category=category) for b in loaded]


def _bfcl_notes(category: str, offset: int, limit: int | None) -> list[str]:
    held = BFCL_HELD_OUT.get(category)
    end = float("inf") if limit is None else offset + limit
    if held is None or end <= held.start or offset >= held.stop:
        return []
    return [f"includes held-out items {held.start}-{held.stop - 1} of {category}: report them, never tune "
            "prompts on them"]


# ---- captured --------------------------------------------------------------------------------------------

_CAPTURED_NOTE = (f"captured calls: the held-out {HELD_OUT_PERCENT}% by sha256(call id), answered by the route's "
                  "teacher; its output is the reference")


def _captured_items(agent: str, store: Any, settings: Any) -> list[EvalItem]:
    if store is None or settings is None:
        raise UsageError("captured: suites need the capture store; pass store= and settings=")
    calls = [c for c in reversed(store.list_calls(agent=agent, limit=1_000_000)) if _is_reference(c, settings)]
    if not calls:
        agents = ", ".join(sorted(s.agent for s in store.stats() if s.agent)) or "none (run the workflow first)"
        raise UsageError(f"no teacher calls captured for agent {agent!r} in {store.url}; agents with calls: {agents}")
    held = [c for c in calls if is_held_out(c.id)]
    if not held:
        raise UsageError(f"none of the {len(calls)} teacher calls of {agent!r} falls in the held-out split "
                         f"({HELD_OUT_PERCENT}% by call id); capture more calls first")
    return [_captured_item(c) for c in held]


def _is_reference(call: Any, settings: Any) -> bool:
    """A valid answer by the route's teacher, from real traffic (never an eval's own output)."""
    if not call.valid or call.response is None or call.source == "eval":
        return False
    return call.binding == settings.binding(settings.route(call.route).teacher).name


def _captured_item(call: Any) -> EvalItem:
    request, response = call.request, call.response
    params = request.get("params") or {}
    base = dict(id=call.id, messages=request["messages"], tools=request.get("tools") or None,
                tool_choice=request.get("tool_choice"), parallel_tool_calls=params.get("parallel_tool_calls"),
                response_format=request.get("response_format"))
    if response.get("tool_calls"):
        from app.validation import parse_calls

        expected = list(parse_calls(content=None, tool_calls=response["tool_calls"]).calls)
        return EvalItem(kind="calls", expected=expected, **base)
    if _is_json_format(request.get("response_format")):
        return EvalItem(kind="json", expected=json.loads(response["content"]), **base)
    return EvalItem(kind="text", expected=response.get("content") or "", **base)


def _is_json_format(response_format: dict | None) -> bool:
    return bool(response_format) and response_format.get("type") in ("json_object", "json_schema")


# ---- jsonl and workflow files ----------------------------------------------------------------------------

class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JsonlLine(_Line):
    id: str | None = None
    messages: list[Message]
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    expected: Any


class WorkflowLine(_Line):
    id: str | None = None
    query: str
    agents: list[str]
    check: dict[str, Any]


def _read_lines(path: Path, model: type[_Line]) -> list[tuple[int, Any]]:
    """(line number, parsed line) for each non-blank line; the first bad one raises with path:line."""
    try:
        text = decode_utf8(path, path.read_bytes(), UsageError)
    except OSError as exc:
        raise UsageError(f"cannot read suite file {path}: {exc.strerror}; give an existing JSONL file") from None
    parsed = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            parsed.append((number, _parse_line(path, number, line, model)))
    if not parsed:
        raise UsageError(f"{path} holds no items; write one JSON object per line")
    return parsed


def _parse_line(path: Path, number: int, line: str, model: type[_Line]) -> Any:
    try:
        return model.model_validate_json(line)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"{path}:{number}: {where + ': ' if where else ''}{first['msg']}; "
                         f"each line is one JSON object with keys {', '.join(model.model_fields)}") from None


def _jsonl_items(path: Path) -> list[EvalItem]:
    return [_jsonl_item(path, number, line) for number, line in _read_lines(path, JsonlLine)]


def _jsonl_item(path: Path, number: int, line: JsonlLine) -> EvalItem:
    where = f"{path}:{number}"
    if line.tools and line.response_format:
        raise UsageError(f"{where}: give `tools` or `response_format`, not both")
    tools = [t.model_dump(exclude_none=True) for t in line.tools] if line.tools else None
    base = dict(id=line.id or f"line{number}", messages=[m.model_dump(exclude_none=True) for m in line.messages],
                tools=tools, response_format=line.response_format)
    if tools:
        expected = _expected_calls(where, line.expected)
        choice = line.tool_choice or ("required" if expected else "auto")
        return EvalItem(kind="calls", expected=expected, tool_choice=choice,
                        parallel_tool_calls=line.parallel_tool_calls, **base)
    if _is_json_format(line.response_format):
        return EvalItem(kind="json", expected=line.expected, **base)
    if not isinstance(line.expected, str):
        raise UsageError(f"{where}: without tools or a JSON response_format, `expected` is the answer text")
    return EvalItem(kind="text", expected=line.expected, **base)


def _expected_calls(where: str, expected: Any) -> list[ParsedCall]:
    calls = [expected] if isinstance(expected, dict) else expected
    ok = isinstance(calls, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                         and isinstance(c.get("arguments", {}), dict) for c in calls)
    if not ok:
        raise UsageError(f'{where}: with tools, `expected` is a list of {{"name": ..., "arguments": {{...}}}}')
    return [ParsedCall(c["name"], c.get("arguments", {})) for c in calls]


def _workflow_items(path: Path) -> list[EvalItem]:
    return [_workflow_item(path, number, line) for number, line in _read_lines(path, WorkflowLine)]


def _workflow_item(path: Path, number: int, line: WorkflowLine) -> EvalItem:
    from agents.plan import SUB_AGENTS  # a plain pydantic module: the names a plan may use
    from training.metrics import workflow_success

    where = f"{path}:{number}"
    if not line.query.strip():
        raise UsageError(f"{where}: `query` is empty")
    if unknown := [a for a in line.agents if a not in SUB_AGENTS] or (not line.agents and ["(none)"]):
        raise UsageError(f"{where}: `agents` must name sub-agents among {', '.join(SUB_AGENTS)}; got {unknown}")
    try:
        workflow_success("", line.check)  # checks the spec's keys and compiles a regex
    except (UsageError, re.error) as exc:
        raise UsageError(f"{where}: bad `check`: {exc}") from None
    return EvalItem(id=line.id or f"line{number}", kind="workflow", query=line.query,
                    expected={"agents": line.agents, "check": line.check})
