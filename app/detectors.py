"""Error detectors: every problem in one call's output, each with structured evidence, and their counts per route
and template over a window. `validate_output` says whether a call is valid (its first error); this says all of it.

Shapes (the stored ones, so captured calls are read as they are): `output` is a response payload
`{"content", "tool_calls", "finish_reason"}` (`app/capture/records.py` `response_payload`), `request` a request
payload `{"messages", "tools", "tool_choice", "response_format", "params"}` (`request_payload`). Rules:
- Findings use the names of `validation.ERROR_TYPES` plus PATTERNS; the type `validate_output` reports is always
  among them, so the two never disagree on validity.
- A format error does not hide the calls behind it: JSON in a fence, amid prose or in a self-closing tag is still
  read, and its arguments checked against the schema.
- Rename by signature, not by spelling (`q` → `query` is 0.33 by string similarity): an object with exactly one
  key its schema does not name and exactly one missing required key whose schema type accepts that key's value.
- `copied_example` (needs the template's text): a JSON value of the output equals, key order and spacing aside, a
  JSON example of at least COPY_MIN_JSON characters in the template; or the output has at least COPY_MIN_TOKENS
  tokens (words and punctuation, lowercased) of which COPY_SHARE or more appear as one contiguous run in it.
- `invented_tool_result`: content holding a `<tool_response>` block or a "Tool result:"-like line whose text is
  not in any tool message of the request. `repeated_call`: a call whose name and arguments (key order aside) an
  earlier assistant turn of the request already made. `cut_at_max_tokens`: finish_reason "length" where tool calls
  or JSON were expected.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jsonschema.exceptions import ValidationError

from app import hermes
from app.errors import UsageError
from app.hermes import FormatError, ParsedCall, kind_of
from app.toolplan import ToolPlan, plan_tools
# One definition of each rule: the schema validator, the keyword → error type map, the call-count rules and the
# wrong-tag rule are validation's, the tag patterns hermes's (private there until they are made public).
from app.validation import (ERROR_TYPES, _check_count, _error_type, _looks_like_call, _schemas_by_name, _validator,
                            _wrong_tag, validate_output)

PATTERNS = ("copied_example", "invented_tool_result", "repeated_call", "cut_at_max_tokens")
FINDING_TYPES = ERROR_TYPES + PATTERNS
COPY_SHARE, COPY_MIN_TOKENS, COPY_MIN_JSON = 0.8, 12, 24


@dataclass(frozen=True)
class Finding:
    error_type: str  # one of FINDING_TYPES
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rename:
    """A key the model misnamed, proven by the signature: `old` at `path` is meant to be `new`."""

    path: tuple[str | int, ...]
    old: str
    new: str


# ---- entry point ------------------------------------------------------------------------------------------

def detect(output: Mapping[str, Any], request: Mapping[str, Any], template_text: str | None = None) -> list[Finding]:
    """Every problem in `output` (a response payload) against `request` (a request payload), in a stable order.
    Raises UsageError only for a bad request (a malformed tool_choice, a schema that is not JSON Schema).

    >>> tools = [{"type": "function", "function": {"name": "search", "parameters": {
    ...     "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
    >>> out = {"content": '<tool_call>{"name": "search", "arguments": {"q": "fjords"}}</tool_call>'}
    >>> [(f.error_type, f.evidence.get("rename")) for f in detect(out, {"tools": tools})]
    [('missing_required', ['q', 'query'])]
    """
    text, raw_calls = _text(output.get("content")), output.get("tool_calls") or []
    tools, params = request.get("tools") or [], request.get("params") or {}
    plan = plan_tools(tools, request.get("tool_choice"), params.get("parallel_tool_calls"))
    findings, calls, value = _read(text, raw_calls, tools, request.get("response_format"))
    if tools or raw_calls:
        findings += _call_findings(calls, tools, plan)
    findings += _patterns(output, request, text, calls, value, template_text, plan)
    return _with_verdict(findings, output, request)


def _with_verdict(findings: list[Finding], output: Mapping[str, Any], request: Mapping[str, Any]) -> list[Finding]:
    """Add validation's own verdict when no finding has its type yet (a case the detectors do not explain)."""
    params = request.get("params") or {}
    verdict = validate_output(content=output.get("content"), tool_calls=output.get("tool_calls"),
                              tools=request.get("tools"), tool_choice=request.get("tool_choice"),
                              response_format=request.get("response_format"),
                              parallel_tool_calls=params.get("parallel_tool_calls"))
    if not verdict.valid and verdict.error_type not in {f.error_type for f in findings}:
        findings.append(Finding(verdict.error_type, verdict.detail or "", {}))
    return findings


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


# ---- reading the output leniently -------------------------------------------------------------------------

def _read(text: str, raw_calls: list, tools: list, response_format: Any) -> tuple[list[Finding], list[ParsedCall], Any]:
    """(format findings, the calls read despite them, the response JSON value or None)."""
    if not raw_calls and not text.strip():
        return [Finding("empty_output", "the model returned neither text nor tool calls")], [], None
    if raw_calls:
        findings, calls = _read_openai(raw_calls)
        return findings, calls, None
    findings, calls = _read_text_calls(text) if tools else ([], [])
    if calls or not _wants_json(response_format):
        return findings, calls, None
    more, value = _read_json_answer(text, response_format)
    return findings + more, calls, value


def _wants_json(response_format: Any) -> bool:
    return isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")


def _read_openai(raw_calls: list) -> tuple[list[Finding], list[ParsedCall]]:
    findings, calls = [], []
    for i, tc in enumerate(raw_calls):
        fn = (tc.get("function") if isinstance(tc, dict) else None) or {}
        name = fn.get("name") if isinstance(fn.get("name"), str) else ""
        if not name:
            findings.append(Finding("invalid_json", f"tool_calls[{i}] has no function name", {"call": i}))
            continue
        try:
            calls.append(ParsedCall(name, hermes.arguments(fn.get("arguments"), name)))
        except FormatError as e:
            findings.append(Finding(e.error_type, e.detail, {"call": i, "name": name,
                                                             "arguments": str(fn.get("arguments"))[:200]}))
    return findings, calls


# The Hermes codec's own patterns of a self-closing tag, a block and a name attribute.
_SELF_CLOSING, _BLOCK, _NAME_ATTR = hermes._SELF_CLOSING, hermes._BLOCK, hermes._NAME_ATTR


def _read_text_calls(text: str) -> tuple[list[Finding], list[ParsedCall]]:
    """Calls in content: self-closing tags, `<tool_call>` blocks, then call JSON left outside any block."""
    findings, calls = [], []
    for m in _SELF_CLOSING.finditer(text):
        name = _tag_name(m.group(0))
        findings.append(Finding("self_closing_tag", f"{m.group(0)} holds no arguments",
                                {"tag": m.group(0), "name": name}))
        if name:  # a nameless tag is no call to check
            calls.append(ParsedCall(name, {}))
    rest = _SELF_CLOSING.sub(" ", text)
    for m in _BLOCK.finditer(rest):
        f, c = _read_block(m.group(0))
        findings, calls = findings + f, calls + c
    f, c = _untagged_calls(_BLOCK.sub(" ", rest))
    return findings + f, calls + c


def _tag_name(tag: str) -> str | None:
    m = _NAME_ATTR.search(tag)
    return next(g for g in m.groups() if g is not None) if m else None


def _read_block(block: str) -> tuple[list[Finding], list[ParsedCall]]:
    try:
        return [], list(hermes.read_calls(block) or ())
    except FormatError as e:
        found = [Finding(e.error_type, e.detail, {"block": block[:200]} | _fence_of(block))]
    body = re.sub(r"^<tool_call\b[^<>]*>|</tool_call\s*>$", "", block.strip(), flags=re.I)
    name = _tag_name(block[:block.find(">") + 1])
    hit = hermes.find_json(body, (lambda v: isinstance(v, dict)) if name else _looks_like_call)
    if hit is None:
        return found, []
    args = hit[2] if name else hit[2].get("arguments", hit[2].get("parameters"))
    return found, [ParsedCall(name or hit[2]["name"], args if isinstance(args, dict) else {})]


def _untagged_calls(text: str) -> tuple[list[Finding], list[ParsedCall]]:
    """Call JSON outside `<tool_call>` blocks, each named for what wraps it: a fence, prose, another tag, nothing."""
    findings, calls = [], []
    for start, end, value in _all_json(text, _looks_like_call):
        try:
            calls.append(ParsedCall(value["name"], hermes.arguments(value.get("arguments", value.get("parameters")),
                                                                    value["name"])))
        except FormatError as e:
            findings.append(Finding(e.error_type, e.detail, {"name": value["name"]}))
        findings.append(_wrapping(text, start, end, f"the call of {value['name']!r}"))
    return findings, calls


def _wrapping(text: str, start: int, end: int, what: str) -> Finding:
    if fence := _open_fence(text, start):
        return Finding("markdown_fence", f"{what} is wrapped in a ``` code fence", {"fence": fence})
    if tag := _wrong_tag(text[:end]):
        return Finding("wrong_tag", f"{what} is wrapped in {tag!r}, not <tool_call>", {"tag": tag})
    before, after = text[:start].strip(), text[end:].strip()
    if before or after:
        return Finding("prose_around_json", f"{what} sits in prose without <tool_call> tags",
                       {"before": before[-80:], "after": after[:80]})
    return Finding("wrong_tag", f"{what} has no <tool_call> tags", {"tag": None})


def _open_fence(text: str, pos: int) -> str | None:
    """The opening fence line (e.g. "```json") when `pos` lies inside a ``` fence."""
    before = text[:pos]
    if before.count("```") % 2 == 0:
        return None
    opening = before[before.rfind("```"):]
    return opening.splitlines()[0].strip() if opening.strip() else "```"


def _fence_of(text: str) -> dict[str, str]:
    m = re.search(r"```[^\n`]*", text)
    return {"fence": m.group(0).strip()} if m else {}


def _all_json(text: str, want=lambda v: isinstance(v, (dict, list))) -> list[tuple[int, int, Any]]:
    """Every JSON value `want` accepts in text, outermost first, none nested in another."""
    found, pos = [], 0
    while (hit := hermes.find_json(text[pos:], want)) is not None:
        start, end, value = hit
        found.append((pos + start, pos + end, value))
        pos += end
    return found


def _read_json_answer(text: str, response_format: dict) -> tuple[list[Finding], Any]:
    """A response_format answer: the JSON, after naming the fence or prose around it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        hits = _all_json(text)
        if not hits:
            return [Finding("invalid_json", f"the response is not valid JSON: {exc.msg} at char {exc.pos}",
                            {"error": exc.msg, "position": exc.pos, "text": text[:200]})], None
        start, end, value = hits[0]
        return _json_wrappers(text, start, end) + _answer_findings(value, response_format), value
    return _answer_findings(value, response_format), value


def _json_wrappers(text: str, start: int, end: int) -> list[Finding]:
    findings, outside = [], text[:start] + text[end:]
    if fence := _open_fence(text, start):
        findings.append(Finding("markdown_fence", "the response is wrapped in a ``` code fence", {"fence": fence}))
        outside = re.sub(r"```[^\n`]*", " ", outside)
    if re.search(r"[A-Za-z]", outside):
        findings.append(Finding("prose_around_json", "the response has text around its JSON",
                                {"before": text[:start].strip()[-80:], "after": text[end:].strip()[:80]}))
    return findings


def _answer_findings(value: Any, response_format: dict) -> list[Finding]:
    if response_format["type"] == "json_object":
        if isinstance(value, dict):
            return []
        return [Finding("type_mismatch", f"response_format json_object needs an object, got {kind_of(value)}",
                        {"path": "response", "expected": "object", "found": kind_of(value), "value": value})]
    spec = response_format.get("json_schema") or {}
    return schema_findings(value, spec.get("schema") or {}, "response")


# ---- schema and call checks -------------------------------------------------------------------------------

def _call_findings(calls: list[ParsedCall], tools: list, plan: ToolPlan) -> list[Finding]:
    findings, schemas = [], _schemas_by_name(tools)
    try:
        _check_count(tuple(calls), plan)
    except FormatError as e:
        findings.append(Finding(e.error_type, e.detail, {"calls": len(calls), "mode": plan.mode,
                                                         "forced": plan.forced, "parallel": plan.parallel}))
    for i, call in enumerate(calls):
        where = {"call": i, "name": call.name}
        if call.name not in schemas or (plan.mode != "none" and call.name not in plan.names):
            allowed = list(plan.names if plan.mode != "none" and call.name in schemas else schemas)
            findings.append(Finding("unknown_function", f"no allowed tool is named {call.name!r}",
                                    where | {"allowed": allowed}))
            continue
        findings += schema_findings(call.arguments, schemas[call.name], "arguments", where)
    return findings


def schema_findings(instance: Any, schema: dict, root: str, extra: Mapping[str, Any] | None = None) -> list[Finding]:
    """Every schema error of `instance`, one finding per missing key, extra key or wrong value, with a proven rename
    attached to both the missing key's and the extra key's finding."""
    renames = {(r.path, r.old): r for r in find_renames(instance, schema)}
    renames |= {(r.path, r.new): r for r in renames.values()}
    errors = sorted(_validator(json.dumps(schema, sort_keys=True)).iter_errors(instance),
                    key=lambda e: (len(e.absolute_path), [str(p) for p in e.absolute_path], str(e.validator)))
    seen, findings = set(), []
    for error in errors:
        for f in _error_findings(error, root, dict(extra or {}), renames):
            key = (f.error_type, f.detail)
            if key not in seen:
                seen.add(key)
                findings.append(f)
    return findings


def _error_findings(error: ValidationError, root: str, extra: dict, renames: dict) -> list[Finding]:
    path, kind, instance = tuple(error.absolute_path), _error_type(error), error.instance
    at = _path_text(root, path)
    if error.validator == "required":
        return [_keyed("missing_required", f"{at}: missing required parameter {k!r}", at, "missing", k, path,
                       extra, renames) for k in error.validator_value if k not in instance]
    if error.validator == "additionalProperties":
        return [_keyed("unknown_parameter", f"{at}: unknown parameter {k!r}", at, "unknown", k, path, extra, renames)
                for k in _unnamed_keys(instance, error.schema)]
    if error.validator == "type":
        expected = error.validator_value
        return [Finding("type_mismatch", f"{at}: expected {expected}, got {kind_of(instance)}",
                        extra | {"path": at, "expected": expected, "found": kind_of(instance), "value": instance})]
    if kind == "enum_violation":
        return [Finding(kind, f"{at}: {json.dumps(instance, default=str)[:60]} is not allowed",
                        extra | {"path": at, "keyword": error.validator, "allowed": error.validator_value,
                                 "value": instance})]
    return [Finding(kind, f"{at}: {error.message[:160]}", extra | {"path": at, "keyword": error.validator})]


def _keyed(kind: str, detail: str, at: str, role: str, key: str, path: tuple, extra: dict, renames: dict) -> Finding:
    evidence = extra | {"path": at, role: key}
    if rename := renames.get((path, key)):
        evidence |= {"unknown": rename.old, "missing": rename.new, "rename": [rename.old, rename.new]}
        detail += f" ({rename.old!r} is {rename.new!r} misnamed)"
    return Finding(kind, detail, evidence)


def _path_text(root: str, path: tuple) -> str:
    return root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _unnamed_keys(instance: dict, schema: dict) -> list[str]:
    named, patterns = schema.get("properties") or {}, schema.get("patternProperties") or {}
    return [k for k in instance if k not in named and not any(re.search(p, k) for p in patterns)]


def find_renames(instance: Any, schema: dict, path: tuple = ()) -> list[Rename]:
    """Renames proven by the signature, at any depth: one unnamed key, one missing required key, and the missing
    key's type accepts the unnamed key's value.

    >>> schema = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
    >>> find_renames({"q": "fjords"}, schema)
    [Rename(path=(), old='q', new='query')]
    """
    if not isinstance(schema, dict):
        return []
    found = []
    if isinstance(instance, dict) and (props := schema.get("properties")):
        unnamed = _unnamed_keys(instance, schema)
        missing = [k for k in schema.get("required") or [] if k not in instance]
        if len(unnamed) == 1 and len(missing) == 1 and _accepts(props.get(missing[0], {}), instance[unnamed[0]]):
            found.append(Rename(path, unnamed[0], missing[0]))
        for key, sub in props.items():
            if key in instance:
                found += find_renames(instance[key], sub, path + (key,))
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += find_renames(item, schema["items"], path + (i,))
    return found


def _accepts(schema: Any, value: Any) -> bool:
    """Whether the schema's type (or, without one, the whole schema) accepts the value."""
    if not isinstance(schema, dict):
        return True
    check = {"type": schema["type"]} if "type" in schema else schema
    return not any(True for _ in _validator(json.dumps(check, sort_keys=True)).iter_errors(value))


# ---- patterns ---------------------------------------------------------------------------------------------

def _patterns(output: Mapping[str, Any], request: Mapping[str, Any], text: str, calls: list[ParsedCall], value: Any,
              template_text: str | None, plan: ToolPlan) -> list[Finding]:
    messages = request.get("messages") or []
    found = _invented_results(text, messages) + _repeated_calls(calls, messages)
    if template_text:
        found += _copied_example(text, calls, value, template_text)
    if output.get("finish_reason") == "length" and _structured(request, calls, plan, output, text):
        params = request.get("params") or {}
        limit = params.get("max_completion_tokens") or params.get("max_tokens")
        found.append(Finding("cut_at_max_tokens", "the output was cut at max_tokens where calls or JSON were expected",
                             {"finish_reason": "length", "max_tokens": limit, "tail": text[-60:]}))
    return found


def _structured(request: Mapping[str, Any], calls: list, plan: ToolPlan, output: Mapping[str, Any],
                text: str) -> bool:
    """Calls or JSON were expected: JSON asked for, a call made or begun, or a call required (a cut text answer
    under `auto` is just text)."""
    return (_wants_json(request.get("response_format")) or bool(calls or output.get("tool_calls"))
            or "<tool_call" in text or plan.mode in ("required", "named"))


_RESPONSE_BLOCK = re.compile(r"<tool_response>(?P<body>.*?)(?:</tool_response>|\Z)", re.I | re.S)
_RESULT_LINE = re.compile(r"^[ \t]*(?P<label>(?:tool|function)[ _](?:result|response|output)s?)[ \t]*:(?P<body>.*)$",
                          re.I | re.M)


def _invented_results(text: str, messages: list) -> list[Finding]:
    given = [_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "tool"]
    found = []
    hits = [("<tool_response>", m.group("body")) for m in _RESPONSE_BLOCK.finditer(text)]
    hits += [(m.group("label") + ":", m.group("body")) for m in _RESULT_LINE.finditer(text)]
    for marker, body in hits:
        body = body.strip()
        if body and any(body in g for g in given):
            continue  # quoting a result the model was given is not inventing one
        found.append(Finding("invented_tool_result", f"the answer writes a {marker} it was never given",
                             {"marker": marker, "text": body[:200]}))
    return found


def _call_key(name: str, arguments: Any) -> tuple[str, str]:
    return name, json.dumps(arguments, sort_keys=True, default=str)


def _earlier_calls(messages: list) -> dict[tuple[str, str], int]:
    """Each call an assistant turn of the request made, keyed by name and normalised arguments, to its turn."""
    seen: dict[tuple[str, str], int] = {}
    for turn, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function") or {}
            try:
                seen.setdefault(_call_key(fn.get("name", ""), hermes.arguments(fn.get("arguments"), "")), turn)
            except FormatError:
                continue
        try:
            for call in hermes.read_calls(_text(m.get("content"))) or ():
                seen.setdefault(_call_key(call.name, call.arguments), turn)
        except FormatError:
            continue
    return seen


def _repeated_calls(calls: list[ParsedCall], messages: list) -> list[Finding]:
    earlier, found, reported = _earlier_calls(messages), [], set()
    for call in calls:
        key = _call_key(call.name, call.arguments)
        if key in earlier and key not in reported:
            reported.add(key)
            found.append(Finding("repeated_call", f"{call.name} was already called with these arguments",
                                 {"name": call.name, "arguments": call.arguments, "turn": earlier[key]}))
    return found


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _copied_example(text: str, calls: list[ParsedCall], value: Any, template: str) -> list[Finding]:
    examples = {_canon(v) for _, _, v in _all_json(template, lambda v: isinstance(v, dict))}
    examples = {e for e in examples if len(e) >= COPY_MIN_JSON}
    values = [v for _, _, v in _all_json(text, lambda v: isinstance(v, dict))] + [c.arguments for c in calls]
    for v in values + ([value] if value is not None else []):
        if _canon(v) in examples:
            return [Finding("copied_example", "the output is a JSON example of its template, copied",
                            {"rule": "json", "example": _canon(v)[:200]})]
    said = _tokens(text or " ".join(json.dumps(c.arguments) for c in calls))
    if len(said) < COPY_MIN_TOKENS:
        return []
    source = _tokens(template)
    run = difflib.SequenceMatcher(None, said, source, autojunk=False).find_longest_match(0, len(said), 0, len(source))
    share = run.size / len(said)
    if share < COPY_SHARE:
        return []
    return [Finding("copied_example", f"{share:.0%} of the output is one run of its template's text",
                    {"rule": "tokens", "share": round(share, 3), "tokens": len(said),
                     "run": " ".join(said[run.a:run.a + run.size])[:200]})]


# ---- aggregation ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatternStat:
    count: int  # calls with at least one finding of the type
    share: float  # of the row's calls
    examples: tuple[str, ...]  # up to 3 call ids, earliest first


@dataclass(frozen=True)
class AggregateRow:
    route: str
    template_id: str | None
    calls: int  # calls with an output (a backend failure has none to inspect)
    patterns: dict[str, PatternStat]  # only the types found, in FINDING_TYPES order


def aggregate(records: Iterable[Any], window: tuple[datetime, datetime],
              templates: Mapping[str, str] | None = None) -> list[AggregateRow]:
    """Findings per (route, template id) over the calls created in [start, end): count, share and example ids per
    type. `records` are CallRecords; `templates` maps a template id to its text (for `copied_example`). A response
    that keeps the model's own words under `raw` (the Router's repairs) is judged on those.
    """
    start, end = window
    chosen = sorted((r for r in records if r.response is not None and start <= r.created_at < end),
                    key=lambda r: (r.created_at, r.id))
    groups: dict[tuple[str, str | None], list[tuple[str, set[str]]]] = {}
    for r in chosen:
        groups.setdefault((r.route, r.template_id), []).append((r.id, _types_of(r, templates or {})))
    ordered = sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or ""))
    return [_row(route, tid, calls) for (route, tid), calls in ordered]


def _types_of(record: Any, templates: Mapping[str, str]) -> set[str]:
    response = dict(record.response)
    if isinstance(response.get("raw"), dict):
        response |= response["raw"]
    try:
        return {f.error_type for f in detect(response, record.request, templates.get(record.template_id or ""))}
    except UsageError:
        return set()  # a request whose schema is broken: its call is counted, its output not judged


def _row(route: str, template_id: str | None, calls: list[tuple[str, set[str]]]) -> AggregateRow:
    patterns = {}
    for kind in FINDING_TYPES:
        ids = [cid for cid, types in calls if kind in types]
        if ids:
            patterns[kind] = PatternStat(len(ids), len(ids) / len(calls), tuple(ids[:3]))
    return AggregateRow(route, template_id, len(calls), patterns)
