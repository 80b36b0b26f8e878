"""The one reading of tools / tool_choice / parallel_tool_calls, and the three places that use it agreeing."""

import pytest

from app.backends.grammar import request_lark
from app.errors import UsageError
from app.toolplan import from_langchain, plan_tools
from app.validation import validate_output
from app.wire import ChatRequest

SEARCH = {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": SEARCH}, {"type": "function", "function": WEATHER}]


def allowed(mode: str, *names: str) -> dict:
    return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": [
        {"type": "function", "function": {"name": n}} for n in names]}}


@pytest.mark.parametrize("choice, mode, names, parallel", [
    (None, "auto", ("search", "get_weather"), True),
    ("auto", "auto", ("search", "get_weather"), True),
    ("required", "required", ("search", "get_weather"), True),
    ("none", "none", (), True),
    ({"type": "function", "function": {"name": "get_weather"}}, "named", ("get_weather",), False),
    ({"type": "function", "name": "get_weather"}, "named", ("get_weather",), False),  # the Responses API spelling
    (allowed("required", "get_weather"), "required", ("get_weather",), True),
    (allowed("auto", "search", "get_weather"), "auto", ("search", "get_weather"), True),
])
def test_plan_reads_every_openai_form(choice, mode, names, parallel):
    plan = plan_tools(TOOLS, choice)
    assert (plan.mode, plan.names, plan.parallel, plan.offered) == (mode, names, parallel, ("search", "get_weather"))


def test_parallel_false_and_no_tools():
    assert plan_tools(TOOLS, "auto", parallel_tool_calls=False).parallel is False
    assert plan_tools(None, "required").mode == "none" and plan_tools([], None).offered == ()


@pytest.mark.parametrize("choice, message", [
    ("sometimes", "not understood"),
    ({"type": "function", "function": {"name": "nope"}}, "'nope', which is not in tools"),
    (allowed("required", "search", "nope"), "'nope', which is not in tools"),
    (allowed("required"), "not understood"),
    ({"type": "function", "function": {}}, "names no function"),
])
def test_bad_tool_choice_names_the_fix(choice, message):
    with pytest.raises(UsageError, match=message):
        plan_tools(TOOLS, choice)


def test_a_tool_without_a_name_is_a_usage_error():
    with pytest.raises(UsageError, match="each tool must be"):
        plan_tools([{"type": "function", "function": {"parameters": {}}}], "auto")


def test_langchain_spellings():
    assert from_langchain("any") == from_langchain(True) == "required"
    assert from_langchain("search") == {"type": "function", "function": {"name": "search"}}
    assert from_langchain("none") == "none"
    with pytest.raises(UsageError):
        from_langchain(None)


def test_grammar_and_validation_agree_on_allowed_tools():
    """The grammar offers only the allowed function, and validation rejects a call of the other one."""
    choice = allowed("required", "get_weather")
    lark = request_lark(ChatRequest(messages=[], tools=TOOLS, tool_choice=choice))
    assert '"get_weather"' in lark and '"search"' not in lark
    other = [{"type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}]
    verdict = validate_output(content=None, tool_calls=other, tools=TOOLS, tool_choice=choice,
                              response_format=None, parallel_tool_calls=None)
    assert (verdict.valid, verdict.error_type) == (False, "unknown_function")
