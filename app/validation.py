"""Checks a model's output against what its request asked for: tool calls against `tools` and `tool_choice`, JSON
against `response_format`. Every failure gets one name from ERROR_TYPES, so the Router, the error detectors and
the metrics count the same things.

Text calls are read by the one Hermes codec (`app/hermes.py`) and tool_choice by the one tool plan
(`app/toolplan.py`). Choices callers rely on:
- Tool calls are read in three forms: OpenAI `tool_calls`; Hermes `<tool_call>{"name", "arguments"}</tool_call>`
  (one or several; "parameters" is read as "arguments", arguments may be a JSON string, a block may hold a list of
  calls); and `<tool_call name="f">{...arguments...}</tool_call>`. Text outside the blocks is allowed, as OpenAI
  allows content beside tool_calls. A last block left unclosed is read when its JSON parses (a stop sequence
  often eats `</tool_call>`).
- Call JSON outside any `<tool_call>` block is an error: in a ``` fence `markdown_fence`, amid prose
  `prose_around_json`, alone `wrong_tag` (the tag is missing).
- Types follow JSON Schema: an integer-valued float such as 3.0 passes as `integer` (the rule since draft 6, and
  what JSON parsers produce from "3.0"), `number` takes integers, booleans are never numbers.
- `unknown_parameter` only where the schema forbids extra properties (`additionalProperties: false`).
- `enum_violation` covers every "right type, value not allowed" keyword (enum, const, bounds, pattern, length);
  `type_mismatch` covers the structural ones (type, anyOf/oneOf, item counts).
- Of several schema errors the shallowest is reported, ties broken by ERROR_TYPES order.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.validators import validator_for

from app import hermes
from app.errors import UsageError
from app.hermes import FormatError as _Reject
from app.hermes import ParsedCall, find_json as _find_json, kind_of as _kind
from app.toolplan import ToolPlan, plan_tools

ERROR_TYPES = (
    "markdown_fence",
    "prose_around_json",
    "invalid_json",
    "self_closing_tag",
    "wrong_tag",
    "unknown_function",
    "unknown_parameter",
    "missing_required",
    "type_mismatch",
    "enum_violation",
    "wrong_call_count",
    "empty_output",
)


@dataclass(frozen=True)
class Verdict:
    valid: bool
    error_type: str | None = None
    detail: str | None = None
    calls: tuple[ParsedCall, ...] = ()
    value: Any = None  # the parsed JSON of a response_format output


# ---- entry points ---------------------------------------------------------------------------------------

def validate_output(
    *,
    content: str | list | None,
    tool_calls: list[dict] | None,
    tools: list[dict] | None,
    tool_choice: str | dict | None,
    response_format: dict | None,
    parallel_tool_calls: bool | None,
) -> Verdict:
    """Judge one assistant message against its request. A bad output never raises; a bad request (a malformed
    tool_choice, a schema that is not JSON Schema) raises UsageError.

    >>> tools = [{"type": "function", "function": {"name": "f", "parameters": {
    ...     "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]
    >>> validate_output(content='<tool_call>{"name": "f", "arguments": {"x": "1"}}</tool_call>', tool_calls=None,
    ...                 tools=tools, tool_choice="auto", response_format=None, parallel_tool_calls=None).error_type
    'type_mismatch'
    """
    try:
        return _validate(_text(content), tool_calls or [], tools or [], tool_choice, response_format,
                         parallel_tool_calls)
    except _Reject as r:
        return Verdict(False, r.error_type, r.detail, r.calls, r.value)


def validate_answer(*, finish_reason: str | None, **output_and_request: Any) -> Verdict:
    """`validate_output` plus the one rule about how the answer ended: structured output (a call, or JSON asked for
    by response_format) cut at max_tokens is invalid even when the cut prefix parses. Router and repair both use it."""
    verdict = validate_output(**output_and_request)
    structured = output_and_request.get("response_format") or output_and_request.get("tool_calls") or verdict.calls
    if finish_reason == "length" and verdict.valid and structured:
        return Verdict(False, "invalid_json", "output cut at max_tokens", verdict.calls, verdict.value)
    return verdict


def parse_calls(*, content: str | list | None, tool_calls: list[dict] | None) -> Verdict:
    """Read tool calls in any of the three forms without checking them against tools (format errors only)."""
    try:
        calls = _parse_openai(tool_calls) if tool_calls else _parse_text(_text(content))
        return Verdict(True, calls=calls or ())
    except _Reject as r:
        return Verdict(False, r.error_type, r.detail, r.calls, r.value)


def _validate(text, tool_calls, tools, tool_choice, response_format, parallel) -> Verdict:
    if not tool_calls and not text.strip():
        raise _Reject("empty_output", "the model returned neither text nor tool calls")
    if tools or tool_calls:
        plan = plan_tools([_plain(t) for t in tools], tool_choice, parallel)
        calls = _parse_openai(tool_calls) if tool_calls else _parse_text(text)
        _check_count(calls or (), plan)
        if calls:
            _check_calls(calls, tools, plan)
            return Verdict(True, calls=calls)
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        return Verdict(True, value=_check_json_output(text, response_format))
    return Verdict(True)


def _text(content: str | list | None) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _plain(obj: Any) -> Any:
    return obj.model_dump() if hasattr(obj, "model_dump") else obj


# ---- tool-call parsing ----------------------------------------------------------------------------------

def _parse_openai(tool_calls: list) -> tuple[ParsedCall, ...]:
    return tuple(_parse_openai_one(_plain(tc), i) for i, tc in enumerate(tool_calls))


def _parse_openai_one(tc: Any, i: int) -> ParsedCall:
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _Reject("invalid_json", f"tool_calls[{i}] has no function name")
    return ParsedCall(fn["name"], hermes.arguments(fn.get("arguments"), fn["name"]))


_ANY_TAG = re.compile(r"<\|?/?(?P<name>[A-Za-z_][\w.:=-]*)[^<>]*?\|?>|\[TOOL_CALLS\]")
_TOOLISH = ("tool", "function", "call", "invoke")
_BROKEN_CALL = re.compile(r'\{\s*"name"\s*:\s*"[^"]*"\s*,\s*"(?:arguments|parameters)"\s*:')


def _parse_text(text: str) -> tuple[ParsedCall, ...] | None:
    """Calls written in the text, None for plain text; raises on markup that tries to be a call and fails."""
    calls = hermes.read_calls(text)
    if calls is None:
        _reject_untagged_calls(text)
    return calls


def _looks_like_call(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("name"), str) and (
        "arguments" in value or "parameters" in value)


def _reject_untagged_calls(text: str) -> None:
    """Plain text passes; a call written without `<tool_call>` tags is named for what went wrong."""
    if tag := _wrong_tag(text):
        raise _Reject("wrong_tag", f"tool calls go in <tool_call>...</tool_call>, not {tag!r}")
    found = _find_json(text, _looks_like_call)
    if found is None:
        if _BROKEN_CALL.search(text):
            raise _Reject("invalid_json", "the text holds a tool call whose JSON does not parse")
        return
    start, end, _ = found
    if text[:start].count("```") % 2 == 1:
        raise _Reject("markdown_fence", "a tool call is wrapped in a ``` code fence; use <tool_call>...</tool_call>")
    if text[:start].strip() or text[end:].strip():
        raise _Reject("prose_around_json", "a tool call's JSON sits in prose without <tool_call> tags")
    raise _Reject("wrong_tag", "tool call JSON without <tool_call> tags; wrap it in <tool_call>...</tool_call>")


def _wrong_tag(text: str) -> str | None:
    """The first tag other than <tool_call> that directly wraps JSON, or that looks like a call wrapper and has
    JSON or attributes after it (a prose mention of `<tool>` alone stays plain text)."""
    for m in _ANY_TAG.finditer(text):
        name = (m.group("name") or "tool_calls").lower()
        after = text[m.end():]
        wraps_json = after.lstrip()[:1] in ("{", "[")
        call_like = any(w in name for w in _TOOLISH) and ("{" in after or "=" in m.group(0))
        if name != "tool_call" and (wraps_json or call_like):
            return m.group(0)
    return None


# ---- call count -----------------------------------------------------------------------------------------

def _check_count(calls: tuple[ParsedCall, ...], plan: ToolPlan) -> None:
    n = len(calls)
    if not plan.offered:
        return  # calls without tools: each is an unknown function, named by _check_calls
    if plan.mode == "none" and n:
        raise _Reject("wrong_call_count", f"tool_choice is 'none' but the model made {n} tool call(s)", calls)
    if plan.mode in ("required", "named") and not n:
        wanted = repr(plan.forced) if plan.forced else "a tool"
        raise _Reject("wrong_call_count", f"tool_choice requires a call to {wanted}; the model answered in text")
    if plan.forced and (other := next((c.name for c in calls if c.name != plan.forced), None)):
        raise _Reject("wrong_call_count", f"tool_choice forces {plan.forced!r}; the model called {other!r}", calls)
    if not plan.parallel and n > 1:
        raise _Reject("wrong_call_count", f"parallel_tool_calls is false but the model made {n} calls", calls)


# ---- schema checks --------------------------------------------------------------------------------------

def _check_calls(calls: tuple[ParsedCall, ...], tools: list, plan: ToolPlan) -> None:
    schemas = _schemas_by_name(tools)
    for call in calls:
        if call.name not in schemas:
            hint = _did_you_mean(call.name, schemas) if schemas else " (the request offered no tools)"
            raise _Reject("unknown_function", f"no tool is named {call.name!r}{hint}", calls)
        if plan.mode != "none" and call.name not in plan.names:
            allowed = ", ".join(plan.names)
            raise _Reject("unknown_function", f"{call.name!r} is not among the tools tool_choice allows ({allowed})",
                          calls)
        try:
            _check_schema(call.arguments, schemas[call.name], call.name)
        except _Reject as r:
            raise _Reject(r.error_type, r.detail, calls) from None


def _schemas_by_name(tools: list) -> dict[str, dict]:
    schemas = {}
    for tool in map(_plain, tools):
        fn = tool.get("function", tool)
        schemas[fn["name"]] = fn.get("parameters") or {"type": "object", "properties": {}}
    return schemas


def _check_json_output(text: str, response_format: dict) -> Any:
    value = hermes.load_json(text, "the response")
    if response_format["type"] == "json_object":
        if not isinstance(value, dict):
            raise _Reject("type_mismatch", f"response_format json_object needs an object, got {_kind(value)}",
                          value=value)
        return value
    spec = response_format.get("json_schema") or {}
    try:
        _check_schema(value, spec.get("schema") or {}, spec.get("name") or "response")
    except _Reject as r:
        raise _Reject(r.error_type, r.detail, value=value) from None
    return value


def _check_schema(instance: Any, schema: dict, where: str) -> None:
    errors = list(_validator(json.dumps(schema, sort_keys=True)).iter_errors(instance))
    if errors:
        first = min(errors, key=lambda e: (len(e.absolute_path), ERROR_TYPES.index(_error_type(e))))
        raise _Reject(_error_type(first), _describe(first, where))


@lru_cache(maxsize=512)
def _validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise UsageError(f"a tool or response_format schema is not valid JSON Schema ({exc.message}); "
                         "fix the request's schema") from None
    return cls(schema)


_KEYWORD_ERROR = {
    "required": "missing_required", "dependentRequired": "missing_required", "dependencies": "missing_required",
    "additionalProperties": "unknown_parameter", "unevaluatedProperties": "unknown_parameter",
    "propertyNames": "unknown_parameter",
    **dict.fromkeys(("enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                     "pattern", "minLength", "maxLength", "format"), "enum_violation"),
}


def _error_type(error: ValidationError) -> str:
    return _KEYWORD_ERROR.get(str(error.validator), "type_mismatch")


def _describe(error: ValidationError, where: str) -> str:
    path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    kind, instance = _error_type(error), error.instance
    if error.validator == "required":
        missing = next(r for r in error.validator_value if r not in instance)
        return f"{path}: missing required parameter {missing!r}"
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        patterns = error.schema.get("patternProperties", {})
        extra = next(k for k in instance if k not in known and not any(re.search(p, k) for p in patterns))
        return f"{path}: unknown parameter {extra!r}{_did_you_mean(extra, known)}"
    if error.validator == "type":
        return f"{path}: expected {error.validator_value}, got {_kind(instance)} {_show(instance)}"
    if kind == "enum_violation":
        return f"{path}: {_show(instance)} is not allowed ({error.message[:120]})"
    return f"{path}: {error.message[:160]}"


def _show(value: Any) -> str:
    return json.dumps(value, default=str)[:60]


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
