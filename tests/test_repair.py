"""Output repair: each deterministic fix, what it must leave alone, and that a claimed repair really validates."""

import json

import pytest

from app.detectors import detect
from app.repair import REPAIRS, repair, repair_response
from app.validation import validate_output
from app.wire import AssistantMessage, ChatRequest, ChatResponse, Choice, ToolCall


def fn(name, properties, required=(), strict=False):
    params = {"type": "object", "properties": properties, "required": list(required)}
    if strict:
        params["additionalProperties"] = False
    return {"type": "function", "function": {"name": name, "parameters": params}}


SEARCH = fn("search", {"query": {"type": "string"}}, ["query"], strict=True)
COUNT = fn("count", {"n": {"type": "integer"}, "ratio": {"type": "number"}, "desc": {"type": "boolean"},
                     "label": {"type": "string"}}, ["n"])
PING = fn("ping", {})
TOOLS = [SEARCH, COUNT, PING]
ANSWER = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"total": {"type": "integer"}, "region": {"type": "string"}},
    "required": ["total", "region"], "additionalProperties": False}}}


def hermes(name, arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def openai_call(name, arguments):
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": "call_7", "type": "function", "function": {"name": name, "arguments": args}}


def req(tools=TOOLS, response_format=None, tool_choice=None, **params):
    return {"messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": tool_choice,
            "response_format": response_format, "params": params}


CALL_JSON = '{"name": "count", "arguments": {"n": 3}}'
# (case, output, request, expected output fields, repairs, valid_after)
CASES = [
    ("valid output is left alone", {"content": hermes("search", {"query": "x"})}, req(),
     {"content": hermes("search", {"query": "x"})}, [], True),
    ("fenced call JSON", {"content": f"```json\n{CALL_JSON}\n```"}, req(),
     {"content": hermes("count", {"n": 3})}, ["strip_fence", "wrap_call"], True),
    ("call JSON amid prose keeps the prose", {"content": f"Counting now: {CALL_JSON}"}, req(),
     {"content": "Counting now: " + hermes("count", {"n": 3})}, ["wrap_call"], True),
    ("bare call JSON", {"content": CALL_JSON}, req(), {"content": hermes("count", {"n": 3})}, ["wrap_call"], True),
    ("call JSON in a wrong tag", {"content": f"<function>{CALL_JSON}</function>"}, req(),
     {"content": hermes("count", {"n": 3})}, ["wrap_call"], True),
    ("fence inside a block", {"content": f"<tool_call>\n```json\n{CALL_JSON}\n```\n</tool_call>"}, req(),
     {"content": hermes("count", {"n": 3})}, ["strip_fence"], True),
    ("q -> query, proven by the signature", {"content": hermes("search", {"q": "fjords"})}, req(),
     {"content": hermes("search", {"query": "fjords"})}, ["rename"], True),
    ("rename in OpenAI tool_calls", {"tool_calls": [openai_call("search", {"q": "fjords"})]}, req(),
     {"tool_calls": [openai_call("search", {"query": "fjords"})]}, ["rename"], True),
    ("no rename without proof (two unknown keys)", {"content": hermes("search", {"q": "a", "k": "b"})}, req(),
     {"content": hermes("search", {"q": "a", "k": "b"})}, [], False),
    ("'5' -> 5 where the schema says integer", {"tool_calls": [openai_call("count", {"n": "5"})]}, req(),
     {"tool_calls": [openai_call("count", {"n": 5})]}, ["coerce"], True),
    ("number and boolean strings", {"content": hermes("count", {"n": "-2", "ratio": "2.5", "desc": "true"})}, req(),
     {"content": hermes("count", {"n": -2, "ratio": 2.5, "desc": True})}, ["coerce"], True),
    ("a string stays a string", {"content": hermes("count", {"n": 1, "label": "5"})}, req(),
     {"content": hermes("count", {"n": 1, "label": "5"})}, [], True),
    ("'five' is not a number", {"content": hermes("count", {"n": "five"})}, req(),
     {"content": hermes("count", {"n": "five"})}, [], False),
    ("'5.5' is not an integer", {"content": hermes("count", {"n": "5.5"})}, req(),
     {"content": hermes("count", {"n": "5.5"})}, [], False),
    ("self-closing tag of a function without parameters", {"content": '<tool_call name="ping"/>'}, req(),
     {"content": hermes("ping", {})}, ["close_tag"], True),
    ("self-closing tag invents no arguments", {"content": '<tool_call name="count"/>'}, req(),
     {"content": hermes("count", {})}, ["close_tag"], False),
    ("name attribute form", {"content": '<tool_call name="count">{"n": "4"}</tool_call>'}, req(),
     {"content": hermes("count", {"n": 4})}, ["tag_form", "coerce"], True),
    ("fence, rename and coercion together",
     {"content": '```json\n{"name": "search", "arguments": {"text": "x"}}\n```\n'
                 + hermes("count", {"n": "7"})}, req(),
     {"content": hermes("search", {"query": "x"}) + "\n" + hermes("count", {"n": 7})},
     ["strip_fence", "wrap_call", "rename", "coerce"], True),
    ("broken call JSON is left as written", {"content": '<tool_call>{"name": "count", "arguments": {"n": </tool_call>'},
     req(), {"content": '<tool_call>{"name": "count", "arguments": {"n": </tool_call>'}, [], False),
    ("JSON answer in a fence and prose",
     {"content": 'Here it is:\n```json\n{"total": 3, "region": "north"}\n```\nHope it helps.'},
     req(tools=None, response_format=ANSWER), {"content": '{"total": 3, "region": "north"}'},
     ["strip_fence", "strip_prose"], True),
    ("JSON answer amid prose", {"content": 'Result: {"total": 3, "region": "north"}.'},
     req(tools=None, response_format=ANSWER), {"content": '{"total": 3, "region": "north"}'}, ["strip_prose"], True),
    ("JSON answer in a bare fence", {"content": '```\n{"total": 3, "region": "north"}\n```'},
     req(tools=None, response_format=ANSWER), {"content": '{"total": 3, "region": "north"}'}, ["strip_fence"], True),
    ("unknown key beside a wrong-typed known one: no proof", {"content": '{"sum": 3, "region": "north", "total": "x"}'},
     req(tools=None, response_format=ANSWER), {"content": '{"sum": 3, "region": "north", "total": "x"}'}, [], False),
    ("JSON answer renamed", {"content": '{"sum": 3, "region": "north"}'},
     req(tools=None, response_format=ANSWER), {"content": '{"total": 3, "region": "north"}'}, ["rename"], True),
    ("a rename needs the type to fit before coercion", {"content": '{"sum": "3", "region": "north"}'},
     req(tools=None, response_format=ANSWER), {"content": '{"sum": "3", "region": "north"}'}, [], False),
    ("rename and coercion inside a nested object", {"content": hermes("nest", {"opts": {"lim": 3, "flag": "false"}})},
     req(tools=[fn("nest", {"opts": {"type": "object", "properties": {"limit": {"type": "integer"},
                                                                      "flag": {"type": "boolean"}},
                                     "required": ["limit"]}})]),
     {"content": hermes("nest", {"opts": {"limit": 3, "flag": False}})}, ["rename", "coerce"], True),
    ("json_object answer in prose", {"content": 'Sure! {"a": 1}'},
     req(tools=None, response_format={"type": "json_object"}), {"content": '{"a": 1}'}, ["strip_prose"], True),
    ("text answers are never touched", {"content": "```python\nprint(1)\n```"}, req(tools=None),
     {"content": "```python\nprint(1)\n```"}, [], True),
    ("an answer without JSON stays", {"content": "no idea"}, req(tools=None, response_format=ANSWER),
     {"content": "no idea"}, [], False),
    ("repaired but cut at max_tokens is still invalid",
     {"content": '```json\n{"total": 3, "region": "north"}\n```', "finish_reason": "length"},
     req(tools=None, response_format=ANSWER), {"content": '{"total": 3, "region": "north"}', "finish_reason": "length"},
     ["strip_fence"], False),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case, output, request_, expected, repairs, valid_after", CASES, ids=IDS)
def test_repair(case, output, request_, expected, repairs, valid_after):
    fixed = repair(output, request_)
    assert {k: fixed.output.get(k) for k in expected} == expected
    assert (fixed.repairs, fixed.valid_after) == (repairs, valid_after)
    assert set(fixed.output) == set(output)  # the same shape back


def _validate(output, request_):
    return validate_output(content=output.get("content"), tool_calls=output.get("tool_calls"),
                           tools=request_["tools"], tool_choice=request_["tool_choice"],
                           response_format=request_["response_format"],
                           parallel_tool_calls=request_["params"].get("parallel_tool_calls"))


@pytest.mark.parametrize("case, output, request_, expected, repairs, valid_after", CASES, ids=IDS)
def test_valid_after_means_validate_output_agrees(case, output, request_, expected, repairs, valid_after):
    fixed = repair(output, request_)
    if fixed.valid_after:
        assert _validate(fixed.output, request_).valid
    assert set(fixed.repairs) <= set(REPAIRS)


@pytest.mark.parametrize("case, output, request_, expected, repairs, valid_after", CASES, ids=IDS)
def test_repair_is_idempotent(case, output, request_, expected, repairs, valid_after):
    once = repair(output, request_)
    twice = repair(once.output, request_)
    assert (twice.output, twice.repairs) == (once.output, [])


@pytest.mark.parametrize("case, output, request_, expected, repairs, valid_after", CASES, ids=IDS)
def test_a_valid_repair_leaves_no_format_or_schema_finding(case, output, request_, expected, repairs, valid_after):
    fixed = repair(output, request_)
    if fixed.valid_after and repairs:
        assert detect(fixed.output, request_) == []
        assert detect(output, request_) != []  # it repaired something the detectors saw


ODD = [{"content": None}, {"content": [{"type": "text", "text": "hi"}]}, {"tool_calls": [{"id": "x"}]},
       {"tool_calls": [openai_call("search", "not json")]}, {"content": "<tool_call>"}, {"content": "```"},
       {"content": "```json\n```json\n{}\n```"}, {"content": '{"name": 5, "arguments": {}}'},
       {"content": '<tool_call name="x">not json</tool_call>'}, {"content": "<tool_call/>"},
       {"content": '<tool_call>[{"name": "search", "arguments": {"q": "a"}}, '
                   '{"name": "count", "arguments": {"n": "1"}}]'},
       {"content": '{"name": "search", "arguments": "{\\"q\\": 1}"}'}, {"content": "[1, {]"}]
ODD_REQUESTS = [req(), req(tools=None, response_format=ANSWER),
                req(tools=None, response_format={"type": "json_object"})]


@pytest.mark.parametrize("request_", ODD_REQUESTS, ids=["tools", "json_schema", "json_object"])
@pytest.mark.parametrize("output", ODD, ids=range(len(ODD)))
def test_odd_output_never_raises_and_valid_after_holds(output, request_):
    fixed = repair(output, request_)
    assert fixed.valid_after == _validate(fixed.output, request_).valid
    assert all(f.error_type for f in detect(output, request_))
    if not _validate(output, request_).valid:
        assert detect(output, request_)


# ---- the Router's hook ------------------------------------------------------------------------------------

def chat(content=None, tool_calls=None, finish="stop"):
    message = AssistantMessage(content=content, tool_calls=tool_calls)
    return ChatResponse(model="m", choices=[Choice(message=message, finish_reason=finish)])


def test_repair_response_returns_repaired_calls_as_openai_tool_calls():
    request = ChatRequest(messages=[{"role": "user", "content": "count"}], tools=TOOLS)
    raw = chat(content='Counting.\n```json\n{"name": "count", "arguments": {"n": "3"}}\n```')
    fixed, repairs = repair_response(request, raw)
    assert repairs == ["strip_fence", "wrap_call", "coerce"]
    assert fixed.message.content == "Counting."
    assert [(c.function.name, c.parsed_arguments()) for c in fixed.message.tool_calls] == [("count", {"n": 3})]
    assert fixed.choices[0].finish_reason == "tool_calls"
    assert raw.message.content.startswith("Counting.\n```json")  # the raw response is untouched, for the capture


def test_repair_response_keeps_call_ids_and_returns_the_same_response_when_nothing_ran():
    request = ChatRequest(messages=[{"role": "user", "content": "count"}], tools=TOOLS)
    call = ToolCall(id="call_keep", function={"name": "count", "arguments": '{"n": "9"}'})
    fixed, repairs = repair_response(request, chat(tool_calls=[call], finish="tool_calls"))
    assert (repairs, fixed.message.tool_calls[0].id, fixed.message.tool_calls[0].parsed_arguments()) == (
        ["coerce"], "call_keep", {"n": 9})
    valid = chat(content="hello")
    assert repair_response(request, valid) == (valid, [])


def test_repair_response_strips_a_json_answer():
    request = ChatRequest(messages=[{"role": "user", "content": "sum"}], response_format=ANSWER)
    fixed, repairs = repair_response(request, chat(content='```json\n{"total": "3", "region": "n"}\n```'))
    assert (json.loads(fixed.message.content), repairs) == ({"total": 3, "region": "n"}, ["strip_fence", "coerce"])


def test_docstring_examples():
    import doctest

    import app.repair

    assert doctest.testmod(app.repair).failed == 0
