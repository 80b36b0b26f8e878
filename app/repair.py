"""Output repair: deterministic fixes of a model's near misses, without a model and without inventing a value. The
Router applies them on routes that enable it and captures the raw output beside the repaired one.

Repairs (REPAIRS, in the order they run):
- `strip_fence`, `strip_prose`: a response_format answer keeps only its JSON (the first JSON value of the text); a
  call written in a ``` fence loses the fence. Prose beside a call stays: content beside calls is allowed.
- `close_tag`: `<tool_call name="f"/>` becomes a `<tool_call>` block of f with no arguments (missing required ones
  stay missing: the output is then still invalid, and says so).
- `tag_form`: `<tool_call name="f">{...}</tool_call>` becomes the Hermes form `{"name": "f", "arguments": {...}}`.
- `wrap_call`: call JSON outside any `<tool_call>` block (bare, amid prose, in a wrong tag) is put in one.
- `rename`: a key renamed as the detectors prove it (`detectors.find_renames`: by signature, never by spelling).
- `coerce`: `"5"` → 5, `"2.5"` → 2.5, `"true"` → true where the schema's type says integer, number or boolean and
  the whole string is that literal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from app import hermes
from app.capture.records import request_payload, response_payload
from app.detectors import find_renames
from app.hermes import FormatError, ParsedCall
from app.validation import _looks_like_call, _schemas_by_name, _validator, validate_answer
from app.wire import AssistantMessage, ChatRequest, ChatResponse, ToolCall

REPAIRS = ("strip_fence", "strip_prose", "close_tag", "tag_form", "wrap_call", "rename", "coerce")


@dataclass(frozen=True)
class Repaired:
    output: dict[str, Any]  # the input's shape: content, tool_calls, finish_reason
    repairs: list[str]  # names from REPAIRS that changed something, in REPAIRS order
    valid_after: bool  # the repaired output passes validate_output and was not cut at max_tokens


def repair(output: Mapping[str, Any], request: Mapping[str, Any]) -> Repaired:
    """Repair a response payload against a request payload (the shapes `detectors.detect` takes). Raises
    UsageError only for a bad request, as validate_output does.

    >>> tools = [{"type": "function", "function": {"name": "f", "parameters": {
    ...     "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]
    >>> fixed = repair({"content": '```json\\n{"name": "f", "arguments": {"n": "5"}}\\n```'}, {"tools": tools})
    >>> fixed.output["content"], fixed.repairs, fixed.valid_after
    ('<tool_call>\\n{"name": "f", "arguments": {"n": 5}}\\n</tool_call>', ['strip_fence', 'wrap_call', 'coerce'], True)
    """
    out, done = dict(output), set()
    schemas = _schemas_by_name(request.get("tools") or [])
    text, calls_found = out.get("content"), False
    if out.get("tool_calls"):
        out["tool_calls"] = [_repair_openai(tc, schemas, done) for tc in out["tool_calls"]]
    elif schemas and isinstance(text, str):
        out["content"], calls_found = _repair_call_text(text, schemas, done)
    fmt = request.get("response_format")
    if not out.get("tool_calls") and not calls_found and isinstance(text, str) and _wants_json(fmt):
        out["content"] = _repair_answer(text, fmt, done)
    return Repaired(out, [r for r in REPAIRS if r in done], _valid(out, request))


def _wants_json(fmt: Any) -> bool:
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def _valid(out: Mapping[str, Any], request: Mapping[str, Any]) -> bool:
    """The verdict the Router gives the same output (validate_answer)."""
    params = request.get("params") or {}
    return validate_answer(content=out.get("content"), tool_calls=out.get("tool_calls"),
                           finish_reason=out.get("finish_reason"), tools=request.get("tools"),
                           tool_choice=request.get("tool_choice"), response_format=request.get("response_format"),
                           parallel_tool_calls=params.get("parallel_tool_calls")).valid


# ---- arguments and values ---------------------------------------------------------------------------------

def _fix_value(value: Any, schema: dict, done: set[str]) -> Any:
    """The value with proven renames applied, then strings coerced where the schema's type asks for a literal."""
    for r in find_renames(value, schema):
        value = _renamed(value, r.path, r.old, r.new)
        done.add("rename")
    for _ in range(32):  # each pass fixes what the last one uncovered (a renamed key's value); a bound, not a loop
        errors = _validator(json.dumps(schema, sort_keys=True)).iter_errors(value)
        fixes = [(tuple(e.absolute_path), lit) for e in errors
                 if e.validator == "type" and (lit := _literal(e.instance, e.validator_value)) is not _NO]
        if not fixes:
            break
        for path, lit in fixes:
            value = _replaced(value, path, lit)
        done.add("coerce")
    return value


_NO = object()
_INTEGER, _NUMBER = re.compile(r"-?\d+"), re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def _literal(value: Any, expected: str | list[str]) -> Any:
    """The integer, number or boolean a string spells exactly, when the schema's type takes it; else _NO."""
    if not isinstance(value, str):
        return _NO
    types, s = ([expected] if isinstance(expected, str) else list(expected)), value.strip()
    if "integer" in types and _INTEGER.fullmatch(s):
        return int(s)
    if "number" in types and _NUMBER.fullmatch(s):
        return int(s) if _INTEGER.fullmatch(s) else float(s)
    if "boolean" in types and s.lower() in ("true", "false"):
        return s.lower() == "true"
    return _NO


def _renamed(value: Any, path: tuple, old: str, new: str) -> Any:
    if path:
        return _replaced(value, path, _renamed(_at(value, path), (), old, new))
    return {(new if k == old else k): v for k, v in value.items()}  # the key keeps its place


def _at(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, list):
        return [_replaced(v, rest, new) if i == head else v for i, v in enumerate(value)]
    return {k: (_replaced(v, rest, new) if k == head else v) for k, v in value.items()}


def _fix_args(name: str, arguments: dict, schemas: dict, done: set[str]) -> dict:
    return _fix_value(arguments, schemas[name], done) if name in schemas else arguments


# ---- OpenAI tool_calls ------------------------------------------------------------------------------------

def _repair_openai(tc: Any, schemas: dict, done: set[str]) -> Any:
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return tc
    try:
        args = hermes.arguments(fn.get("arguments"), fn["name"])
    except FormatError:
        return tc  # arguments that do not parse are left as the model wrote them
    fixes: set[str] = set()
    fixed = _fix_args(fn["name"], args, schemas, fixes)
    if not fixes:
        return tc
    done.update(fixes)
    return {**tc, "function": {**fn, "arguments": json.dumps(fixed)}}


# ---- calls written in content -----------------------------------------------------------------------------

# The Hermes codec's own patterns (a self-closing tag, a block with `attrs` and `body`, a name attribute).
_TAGS = re.compile(f"(?P<closed>{hermes._SELF_CLOSING.pattern})|(?P<block>{hermes._BLOCK.pattern})", re.I | re.S)
_NAME_ATTR = hermes._NAME_ATTR


def _repair_call_text(text: str, schemas: dict, done: set[str]) -> tuple[str, bool]:
    """(the text with its calls repaired, whether it holds any call)."""
    parts, pos, found = [], 0, False
    for m in _TAGS.finditer(text):
        gap, n = _repair_untagged(text[pos:m.start()], schemas, done)
        new, ok = _repair_tag(m, schemas, done)
        parts += [gap, new]
        found, pos = found or n or ok, m.end()
    gap, n = _repair_untagged(text[pos:], schemas, done)
    return "".join(parts + [gap]), found or n


def _render(calls: list[ParsedCall]) -> str:
    return "\n".join(hermes.format_call(c.name, c.arguments) for c in calls)


def _tag_name(attrs: str) -> str | None:
    m = _NAME_ATTR.search(attrs)
    return next(g for g in m.groups() if g is not None) if m else None


def _repair_tag(m: re.Match, schemas: dict, done: set[str]) -> tuple[str, bool]:
    """One self-closing tag or `<tool_call>` block, rewritten only when something in it was fixed."""
    if m.group("closed"):
        name = _tag_name(m.group("closed"))
        if not name:
            return m.group(0), False
        done.add("close_tag")
        return _render([ParsedCall(name, _fix_args(name, {}, schemas, done))]), True
    name, body = _tag_name(m.group("attrs")), m.group("body")
    calls, fixes = _block_calls(name, body)
    if calls is None:
        return m.group(0), False
    fixed = [ParsedCall(c.name, _fix_args(c.name, c.arguments, schemas, fixes)) for c in calls]
    if not fixes:
        return m.group(0), True
    done.update(fixes)
    return _render(fixed), True


def _block_calls(name: str | None, body: str) -> tuple[list[ParsedCall] | None, set[str]]:
    """The calls of a block body and the repairs reading them took; None when nothing in it can be read."""
    fixes = {"tag_form"} if name else set()
    try:
        if name:
            return [ParsedCall(name, hermes.arguments(body, name))], fixes
        return list(hermes.read_calls(f"{hermes.TOOL_OPEN}{body}{hermes.TOOL_CLOSE}") or ()), fixes
    except FormatError:
        pass
    want = (lambda v: isinstance(v, dict)) if name else _looks_like_call
    hit = hermes.find_json(body, want)
    if hit is None:
        return None, set()
    fixes.add("strip_fence" if "```" in body else "strip_prose")
    if name:
        return [ParsedCall(name, hit[2])], fixes
    args = hit[2].get("arguments", hit[2].get("parameters"))
    try:
        return [ParsedCall(hit[2]["name"], hermes.arguments(args, hit[2]["name"]))], fixes
    except FormatError:
        return None, set()


_FENCE_OPEN = re.compile(r"```[^\n`]*\n?[ \t]*$")
_FENCE_CLOSE = re.compile(r"^[ \t]*\n?```")


def _repair_untagged(text: str, schemas: dict, done: set[str]) -> tuple[str, bool]:
    """Call JSON outside any block, put in one; a fence or a wrong tag directly around it goes."""
    out, pos, found = [], 0, False
    while (hit := hermes.find_json(text[pos:], _looks_like_call)) is not None:
        start, end, value = pos + hit[0], pos + hit[1], hit[2]
        try:
            call = ParsedCall(value["name"], hermes.arguments(value.get("arguments", value.get("parameters")),
                                                              value["name"]))
        except FormatError:
            out.append(text[pos:end])
            pos = end
            continue
        start, end, wrapper = _unwrap(text, start, end, pos)
        if wrapper:
            done.add(wrapper)
        done.add("wrap_call")
        out += [text[pos:start], _render([ParsedCall(call.name, _fix_args(call.name, call.arguments, schemas, done))])]
        pos, found = end, True
    return "".join(out) + text[pos:], found


def _unwrap(text: str, start: int, end: int, floor: int) -> tuple[int, int, str | None]:
    """Widen [start, end) over a ``` fence or a non-call tag pair that directly wraps it."""
    before, after = text[floor:start], text[end:]
    if (o := _FENCE_OPEN.search(before)) and (c := _FENCE_CLOSE.match(after)):
        return floor + o.start(), end + c.end(), "strip_fence"
    o = re.search(r"<(?P<tag>[A-Za-z_][\w.:-]*)\b[^<>]*>\s*$", before)
    if o and (c := re.match(rf"\s*</{re.escape(o.group('tag'))}\s*>", after)):
        return floor + o.start(), end + c.end(), None
    return start, end, None


# ---- response_format answers ------------------------------------------------------------------------------

def _repair_answer(text: str, fmt: dict, done: set[str]) -> str:
    """The answer's JSON alone, its keys and literals fixed by the schema; unchanged when there is no JSON."""
    try:
        value, kept = json.loads(text), text
    except json.JSONDecodeError:
        hit = hermes.find_json(text)
        if hit is None:
            return text
        start, end, value = hit
        kept = text[start:end]
        if "```" in text:
            done.add("strip_fence")
        if re.search(r"[A-Za-z]", re.sub(r"```[^\n`]*", " ", text[:start] + text[end:])):
            done.add("strip_prose")
    schema = (fmt.get("json_schema") or {}).get("schema") if fmt["type"] == "json_schema" else None
    if not schema:
        return kept
    fixes: set[str] = set()
    fixed = _fix_value(value, schema, fixes)
    done.update(fixes)
    return json.dumps(fixed) if fixes else kept


# ---- the Router's hook ------------------------------------------------------------------------------------

def repair_response(req: ChatRequest, resp: ChatResponse) -> tuple[ChatResponse, list[str]]:
    """The response with its first choice repaired, and the repairs that ran ([] and `resp` itself when none did).

    The Router calls this on routes that enable repair, before judging the attempt, and captures the raw output
    (`response_payload(resp)` of the response it got) under `raw` with the `repairs` beside the repaired one.
    Calls the repair wrote in content are returned as OpenAI `tool_calls`, as the local backends return them.
    """
    request = request_payload(req)
    fixed = repair(response_payload(resp), request)
    if not fixed.repairs:
        return resp, []
    choice = resp.choices[0]
    message, finish = _message(fixed.output, bool(req.tools), choice.finish_reason)
    new_choice = choice.model_copy(update={"message": message, "finish_reason": finish})
    return resp.model_copy(update={"choices": [new_choice, *resp.choices[1:]]}), fixed.repairs


def _message(out: Mapping[str, Any], tools: bool, finish: str | None) -> tuple[AssistantMessage, str | None]:
    if out.get("tool_calls"):
        return AssistantMessage(content=out.get("content"), tool_calls=[ToolCall.model_validate(c)
                                                                         for c in out["tool_calls"]]), finish
    content, calls = hermes.split_output(out.get("content") or "") if tools else (out.get("content"), [])
    if not calls:
        return AssistantMessage(content=out.get("content")), finish
    return AssistantMessage(content=content, tool_calls=hermes.to_tool_calls(calls)), \
        "tool_calls" if finish != "length" else finish
