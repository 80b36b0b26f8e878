"""Error detectors: every problem of an output with its evidence, the new patterns, and their counts per route."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from app.capture.records import CallRecord
from app.detectors import FINDING_TYPES, Finding, aggregate, detect, find_renames
from app.validation import validate_output
from prompts.base import base_templates


def fn(name, properties, required=(), strict=False):
    params = {"type": "object", "properties": properties, "required": list(required)}
    if strict:
        params["additionalProperties"] = False
    return {"type": "function", "function": {"name": name, "parameters": params}}


SEARCH = fn("search", {"query": {"type": "string"}}, ["query"])
STRICT = fn("lookup", {"query": {"type": "string"}, "n": {"type": "integer"}}, ["query"], strict=True)
COUNT = fn("count", {"n": {"type": "integer"}, "unit": {"type": "string", "enum": ["a", "b"]},
                     "label": {"type": "string"}}, ["n", "label"])
TOOLS = [SEARCH, STRICT, COUNT]
PLAN_SCHEMA = {"type": "json_schema", "json_schema": {"name": "plan", "schema": {
    "type": "object", "properties": {"steps": {"type": "integer"}, "title": {"type": "string"}},
    "required": ["steps", "title"]}}}


def hermes(name, arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def openai_call(name, arguments):
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def req(tools=TOOLS, messages=(), response_format=None, tool_choice=None, **params):
    return {"messages": list(messages), "tools": tools, "tool_choice": tool_choice,
            "response_format": response_format, "params": params}


ORCHESTRATOR = base_templates()["orchestrator"].text
PLAN_EXAMPLE = next(line for line in ORCHESTRATOR.splitlines() if line.startswith('{"sub_agents"'))
EARLIER = [{"role": "user", "content": "find fjords"},
           {"role": "assistant", "tool_calls": [openai_call("search", {"query": "fjords"})]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"rows": 3}'}]

# (case, output, request, template, expected findings: (error_type, evidence subset) in order)
CASES = [
    ("valid call", {"content": hermes("search", {"query": "x"})}, req(), None, []),
    ("rename q->query, open schema", {"content": hermes("search", {"q": "fjords"})}, req(), None,
     [("missing_required", {"unknown": "q", "missing": "query", "rename": ["q", "query"], "path": "arguments"})]),
    ("rename on a strict schema names both sides", {"tool_calls": [openai_call("lookup", {"q": "x"})]}, req(), None,
     [("unknown_parameter", {"unknown": "q", "rename": ["q", "query"]}),
      ("missing_required", {"missing": "query", "rename": ["q", "query"]})]),
    ("no rename when the type does not fit", {"content": hermes("search", {"q": 5})}, req(), None,
     [("missing_required", {"missing": "query"})]),
    ("no rename with two unknown keys", {"tool_calls": [openai_call("lookup", {"q": "x", "k": "y"})]}, req(), None,
     [("unknown_parameter", {"unknown": "q"}), ("unknown_parameter", {"unknown": "k"}),
      ("missing_required", {"missing": "query"})]),
    ("string for integer", {"tool_calls": [openai_call("count", {"n": "5", "label": "x"})]}, req(), None,
     [("type_mismatch", {"path": "arguments.n", "expected": "integer", "found": "string", "value": "5"})]),
    ("every schema error, not the first", {"content": hermes("count", {"n": "5", "unit": "c"})}, req(), None,
     [("missing_required", {"missing": "label"}), ("type_mismatch", {"path": "arguments.n"}),
      ("enum_violation", {"path": "arguments.unit", "value": "c", "allowed": ["a", "b"]})]),
    ("fenced call, and the errors inside it",
     {"content": '```json\n{"name": "count", "arguments": {"n": "5", "label": "x"}}\n```'}, req(), None,
     [("markdown_fence", {"fence": "```json"}), ("type_mismatch", {"path": "arguments.n"})]),
    ("self-closing tag", {"content": '<tool_call name="search"/>'}, req(), None,
     [("self_closing_tag", {"tag": '<tool_call name="search"/>', "name": "search"}),
      ("missing_required", {"missing": "query"})]),
    ("a nameless self-closing tag", {"content": "<tool_call/>"}, req(), None,
     [("self_closing_tag", {"tag": "<tool_call/>", "name": None})]),
    ("prose around a call", {"content": 'Sure: {"name": "search", "arguments": {"query": "x"}} done'}, req(), None,
     [("prose_around_json", {"before": "Sure:", "after": "done"})]),
    ("wrong tag", {"content": '<function>{"name": "search", "arguments": {"query": "x"}}</function>'}, req(), None,
     [("wrong_tag", {"tag": "<function>"})]),
    ("broken block JSON", {"content": '<tool_call>{"name": "search", "arguments": {"query": </tool_call>'}, req(),
     None, [("invalid_json", {})]),
    ("empty output", {"content": ""}, req(), None, [("empty_output", {})]),
    ("an OpenAI call without a name", {"tool_calls": [{"id": "x", "type": "function", "function": {}}]}, req(), None,
     [("invalid_json", {"call": 0})]),
    ("OpenAI arguments that do not parse", {"tool_calls": [openai_call("search", {"query": "x"}) | {
        "function": {"name": "search", "arguments": "{query"}}]}, req(), None,
     [("invalid_json", {"call": 0, "name": "search", "arguments": "{query"})]),
    ("unknown function", {"content": hermes("nope", {})}, req(), None,
     [("unknown_function", {"name": "nope", "allowed": ["search", "lookup", "count"]})]),
    ("two calls where parallel calls are off",
     {"content": hermes("search", {"query": "a"}) + hermes("search", {"query": "b"})},
     req(parallel_tool_calls=False), None, [("wrong_call_count", {"calls": 2, "parallel": False})]),
    ("text where a call is required", {"content": "I cannot."}, req(tool_choice="required"), None,
     [("wrong_call_count", {"calls": 0, "mode": "required"})]),
    ("JSON answer fenced in prose", {"content": 'Here:\n```json\n{"steps": 2, "title": "t"}\n```\nEnjoy.'},
     req(tools=None, response_format=PLAN_SCHEMA), None,
     [("markdown_fence", {"fence": "```json"}), ("prose_around_json", {"before": "Here:\n```json"})]),
    ("JSON answer with every schema error", {"content": '{"steps": "2"}'}, req(tools=None, response_format=PLAN_SCHEMA),
     None, [("missing_required", {"path": "response", "missing": "title"}),
            ("type_mismatch", {"path": "response.steps", "expected": "integer", "value": "2"})]),
    ("JSON answer that does not parse", {"content": '{"steps": 2,'}, req(tools=None, response_format=PLAN_SCHEMA),
     None, [("invalid_json", {"text": '{"steps": 2,'})]),
    ("json_object answer that is an array", {"content": "[1]"},
     req(tools=None, response_format={"type": "json_object"}), None,
     [("type_mismatch", {"expected": "object", "found": "array"})]),
    ("invented <tool_response>", {"content": "Done.\n<tool_response>\n{\"rows\": 12}\n</tool_response>"},
     req(tools=None), None, [("invented_tool_result", {"marker": "<tool_response>", "text": '{"rows": 12}'})]),
    ("invented 'Tool result:' line", {"content": "Tool result: 12 rows in q4_by_region.\nSo 12 rows."},
     req(tools=None), None, [("invented_tool_result", {"marker": "Tool result:", "text": "12 rows in q4_by_region."})]),
    ("quoting a result it was given is not inventing",
     {"content": 'It said <tool_response>{"rows": 3}</tool_response>'}, req(tools=None, messages=EARLIER), None, []),
    ("repeated call, key order aside", {"content": hermes("search", {"query": "fjords"})}, req(messages=EARLIER), None,
     [("repeated_call", {"name": "search", "arguments": {"query": "fjords"}, "turn": 1})]),
    ("repeated Hermes call from an assistant's text", {"tool_calls": [openai_call("count", {"label": "x", "n": 1})]},
     req(messages=[{"role": "assistant", "content": hermes("count", {"n": 1, "label": "x"})}]), None,
     [("repeated_call", {"name": "count", "turn": 0})]),
    ("same tool, new arguments: not repeated", {"content": hermes("search", {"query": "lakes"})},
     req(messages=EARLIER), None, []),
    ("cut at max_tokens in a JSON answer", {"content": '{"steps": 2, "title": "t"}', "finish_reason": "length"},
     req(tools=None, response_format=PLAN_SCHEMA, max_tokens=16), None,
     [("cut_at_max_tokens", {"finish_reason": "length", "max_tokens": 16})]),
    ("cut mid call", {"content": '<tool_call>{"name": "search", "arguments": {"query": "fj', "finish_reason": "length"},
     req(), None, [("invalid_json", {}), ("cut_at_max_tokens", {})]),
    ("a cut text answer under auto is just text", {"content": "The answer is", "finish_reason": "length"},
     req(), None, []),
    ("the orchestrator's plan is its template's example", {"content": PLAN_EXAMPLE}, req(tools=None), ORCHESTRATOR,
     [("copied_example", {"rule": "json"})]),
    ("the example respaced and reordered is still the example",
     {"content": json.dumps(dict(reversed(list(json.loads(PLAN_EXAMPLE).items()))), indent=2)}, req(tools=None),
     ORCHESTRATOR, [("copied_example", {"rule": "json"})]),
    ("the template's sentences copied", {"content": "Put tasks that depend on earlier results in later steps; tasks "
                                                    "in one step run in parallel. Thanks"},
     req(tools=None), ORCHESTRATOR, [("copied_example", {"rule": "tokens", "tokens": 20, "share": 0.95})]),
    ("a call with the template's placeholder arguments",
     {"content": hermes("sort_rows", {"dataset": "<a dataset from the context>", "by": "revenue", "descending": True})},
     req(tools=[fn("sort_rows", {"dataset": {"type": "string"}, "by": {"type": "string"},
                                 "descending": {"type": "boolean"}})]),
     base_templates()["processing"].text, [("copied_example", {"rule": "json"})]),
    ("a plan of its own is not copied",
     {"content": json.dumps({"sub_agents": ["retrieval"], "parallel": False, "aggregation_strategy": "table",
                             "steps": [{"tasks": [{"agent": "retrieval", "task": "Fetch revenue per region"}]}]})},
     req(tools=None), ORCHESTRATOR, []),
    ("a short answer using template words is not copied", {"content": "Fetch revenue per product."}, req(tools=None),
     ORCHESTRATOR, []),
]


def _matches(finding: Finding, kind: str, evidence: dict) -> bool:
    return finding.error_type == kind and all(finding.evidence.get(k) == v for k, v in evidence.items())


@pytest.mark.parametrize("case, output, request_, template, expected", CASES, ids=[c[0] for c in CASES])
def test_detect(case, output, request_, template, expected):
    found = detect(output, request_, template)
    assert [f.error_type for f in found] == [kind for kind, _ in expected], found
    for f, (kind, evidence) in zip(found, expected):
        assert _matches(f, kind, evidence), (f, evidence)
        assert "rename" in evidence or "rename" not in f.evidence, f  # no rename the case does not prove
    assert all(f.error_type in FINDING_TYPES and f.detail for f in found)


@pytest.mark.parametrize("case, output, request_, template, expected", CASES, ids=[c[0] for c in CASES])
def test_validation_error_is_always_among_the_findings(case, output, request_, template, expected):
    verdict = validate_output(content=output.get("content"), tool_calls=output.get("tool_calls"),
                              tools=request_["tools"], tool_choice=request_["tool_choice"],
                              response_format=request_["response_format"],
                              parallel_tool_calls=request_["params"].get("parallel_tool_calls"))
    types = {f.error_type for f in detect(output, request_, template)}
    assert verdict.valid or verdict.error_type in types


def test_renames_are_found_at_depth_and_by_type():
    schema = {"type": "object", "properties": {"opts": {"type": "object", "properties": {
        "limit": {"type": "integer"}, "name": {"type": "string"}}, "required": ["limit"]}}}
    assert [(r.path, r.old, r.new) for r in find_renames({"opts": {"lim": 3, "name": "x"}}, schema)] == [
        (("opts",), "lim", "limit")]
    assert find_renames({"opts": {"lim": "3"}}, schema) == []  # a string is no integer: not proven


def test_string_similarity_would_not_find_the_rename():
    import difflib

    assert difflib.SequenceMatcher(None, "q", "query").ratio() < 0.6  # why the signature is the proof


# ---- aggregate --------------------------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(i, route, template_id, content, *, minutes=0, response=True, raw=None, request=None):
    resp = {"content": content, "tool_calls": None, "finish_reason": "stop"} if response else None
    if raw is not None:
        resp["raw"] = {"content": raw, "tool_calls": None}
    return CallRecord(route=route, binding="gguf:x", id=f"c{i}", template_id=template_id,
                      request=request or req(tools=[SEARCH]), response=resp, created_at=T0 + timedelta(minutes=minutes))


def test_aggregate_counts_shares_and_examples_per_route_and_template():
    good, fenced = hermes("search", {"query": "x"}), '```json\n{"name": "search", "arguments": {"q": "x"}}\n```'
    records = [
        record(1, "retrieval", "retrieval/base@1", fenced, minutes=5),
        record(2, "retrieval", "retrieval/base@1", good, minutes=1),
        *[record(10 + i, "retrieval", "retrieval/base@1", fenced, minutes=10 + i) for i in range(3)],
        record(20, "retrieval", "retrieval/evolved@2", good, minutes=2),
        record(30, "processing", None, "", minutes=3),
        record(40, "retrieval", "retrieval/base@1", fenced, minutes=60),  # outside the window
        record(41, "retrieval", "retrieval/base@1", fenced, minutes=-1),  # before it
        record(50, "retrieval", "retrieval/base@1", "", minutes=4, response=False),  # a backend failure
        record(60, "retrieval", "retrieval/evolved@2", good, minutes=6, raw='<tool_call name="search"/>'),
    ]
    rows = aggregate(records, (T0, T0 + timedelta(minutes=60)))
    table = {(r.route, r.template_id): r for r in rows}
    assert [(r.route, r.template_id, r.calls) for r in rows] == [
        ("processing", None, 1), ("retrieval", "retrieval/base@1", 5), ("retrieval", "retrieval/evolved@2", 2)]
    base = table["retrieval", "retrieval/base@1"].patterns
    assert list(base) == ["markdown_fence", "missing_required"]
    assert (base["markdown_fence"].count, base["markdown_fence"].share) == (4, 0.8)
    assert base["markdown_fence"].examples == ("c1", "c10", "c11")  # earliest three
    assert table["processing", None].patterns["empty_output"].share == 1.0
    evolved = table["retrieval", "retrieval/evolved@2"].patterns  # judged on what the model wrote (raw)
    assert {k: (v.count, v.examples) for k, v in evolved.items()} == {
        "self_closing_tag": (1, ("c60",)), "missing_required": (1, ("c60",))}


def test_aggregate_reads_template_texts_for_copied_examples():
    records = [record(1, "orchestrator", "orchestrator/base@1", PLAN_EXAMPLE, request=req(tools=None)),
               record(2, "orchestrator", "orchestrator/base@1", '{"steps": []}', request=req(tools=None))]
    window = (T0, T0 + timedelta(hours=1))
    assert aggregate(records, window)[0].patterns == {}
    row = aggregate(records, window, {"orchestrator/base@1": ORCHESTRATOR})[0]
    assert (row.patterns["copied_example"].share, row.patterns["copied_example"].examples) == (0.5, ("c1",))


def test_docstring_examples():
    import doctest

    import app.detectors

    assert doctest.testmod(app.detectors).failed == 0
