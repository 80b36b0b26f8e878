"""Output validation: every form of tool call, every near miss, every schema rule, each named by the taxonomy."""

import json

import pytest

from app.errors import UsageError
from app.validation import ERROR_TYPES, ParsedCall, Verdict, parse_calls, validate_output

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "ratio": {"type": "number"},
        "stops": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "minutes": {"type": "integer"}}, "required": ["name"],
            "additionalProperties": False}},
    },
    "required": ["city"],
    "additionalProperties": False,
}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
TOOLS = [WEATHER, SEARCH]


def check(content=None, tool_calls=None, tools=TOOLS, tool_choice="auto", response_format=None, parallel=None):
    return validate_output(content=content, tool_calls=tool_calls, tools=tools, tool_choice=tool_choice,
                           response_format=response_format, parallel_tool_calls=parallel)


def openai_call(name, arguments):
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}


def hermes(name, arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# ---- the three forms ------------------------------------------------------------------------------------

def test_openai_tool_calls_parse_and_validate():
    v = check(tool_calls=[openai_call("get_weather", {"city": "Paris", "days": 3})])
    assert v == Verdict(True, None, None, (ParsedCall("get_weather", {"city": "Paris", "days": 3}),), None)


def test_openai_empty_arguments_string_means_no_arguments():
    v = check(tool_calls=[openai_call("search", "")])
    assert (v.valid, v.error_type, v.calls) == (False, "missing_required", (ParsedCall("search", {}),))


def test_hermes_single_and_several_blocks_with_whitespace():
    text = ("  " + hermes("get_weather", {"city": "Oslo"}) + "\n\n"
            + hermes("search", {"query": "fjords"}) + "  \n")
    v = check(content=text)
    assert v.valid
    assert v.calls == (ParsedCall("get_weather", {"city": "Oslo"}), ParsedCall("search", {"query": "fjords"}))


def test_hermes_parameters_alias_string_arguments_and_list_body():
    text = ('<tool_call>{"name": "search", "parameters": {"query": "a"}}</tool_call>'
            '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"b\\"}"}</tool_call>'
            '<tool_call>[{"name": "search", "arguments": {"query": "c"}}]</tool_call>')
    assert [c.arguments["query"] for c in check(content=text).calls] == ["a", "b", "c"]


def test_attribute_form():
    v = check(content='<tool_call name="get_weather">{"city": "Rome", "unit": "celsius"}</tool_call>')
    assert v.valid and v.calls == (ParsedCall("get_weather", {"city": "Rome", "unit": "celsius"}),)
    v = check(content="<tool_call name='search'>\n{\"query\": \"x\"}\n</tool_call>")
    assert v.valid and v.calls[0].name == "search"


def test_unclosed_last_block_is_read_when_its_json_parses():
    v = check(content='<tool_call>{"name": "search", "arguments": {"query": "q"}}')
    assert v.valid and v.calls == (ParsedCall("search", {"query": "q"}),)
    assert check(content='<tool_call>{"name": "search", "arguments": {"query": "q"').error_type == "invalid_json"


def test_prose_beside_tool_call_blocks_is_allowed():
    v = check(content="Let me look that up.\n" + hermes("search", {"query": "q"}))
    assert v.valid and len(v.calls) == 1


def test_tool_calls_win_over_content_markup():
    v = check(content="<tool_call/>", tool_calls=[openai_call("search", {"query": "q"})])
    assert v.valid and v.calls == (ParsedCall("search", {"query": "q"}),)


def test_pydantic_tool_calls_and_tools_are_accepted():
    from app.wire import FunctionCall, FunctionDef, Tool, ToolCall

    tc = ToolCall(function=FunctionCall(name="f", arguments='{"a": 1}'))
    tool = Tool(function=FunctionDef(name="f", parameters={"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert check(tool_calls=[tc], tools=[tool]).valid


# ---- format near misses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, error_type", [
    ("", "empty_output"),
    ("   \n", "empty_output"),
    (None, "empty_output"),
    ('```json\n{"name": "search", "arguments": {"query": "q"}}\n```', "markdown_fence"),
    ('<tool_call>```json\n{"name": "search", "arguments": {"query": "q"}}\n```</tool_call>', "markdown_fence"),
    ('I will call {"name": "search", "arguments": {"query": "q"}} now.', "prose_around_json"),
    ('<tool_call>Calling: {"name": "search", "arguments": {"query": "q"}}</tool_call>', "prose_around_json"),
    ('<tool_call>{"name": "search", "arguments": {"query": "q"}</tool_call>', "invalid_json"),
    ("<tool_call>{'name': 'search'}</tool_call>", "invalid_json"),
    ('<tool_call>{"arguments": {"query": "q"}}</tool_call>', "invalid_json"),
    ("<tool_call></tool_call>", "invalid_json"),
    ('<tool_call name="search">{"query": </tool_call>', "invalid_json"),
    ('<tool_call name="search">["q"]</tool_call>', "invalid_json"),
    ('{"name": "search", "arguments": {"query": "q"', "invalid_json"),
    ("<tool_call/>", "self_closing_tag"),
    ('<tool_call name="search" />', "self_closing_tag"),
    ('<function_call>{"name": "search", "arguments": {"query": "q"}}</function_call>', "wrong_tag"),
    ('<tool>{"name": "search", "arguments": {"query": "q"}}</tool>', "wrong_tag"),
    ('<function=search>{"query": "q"}</function>', "wrong_tag"),
    ("<function=search><parameter=query>q</parameter></function>", "wrong_tag"),
    ('<invoke name="search">q</invoke>', "wrong_tag"),
    ('<json>{"query": "q"}</json>', "wrong_tag"),
    ('<|python_tag|>{"name": "search", "parameters": {"query": "q"}}', "wrong_tag"),
    ('[TOOL_CALLS][{"name": "search", "arguments": {"query": "q"}}]', "wrong_tag"),
    ('{"name": "search", "arguments": {"query": "q"}}', "wrong_tag"),
])
def test_format_near_misses_are_named(content, error_type):
    v = check(content=content)
    assert (v.valid, v.error_type) == (False, error_type), v.detail
    assert v.detail


@pytest.mark.parametrize("arguments, error_type", [
    ('```json\n{"query": "q"}\n```', "markdown_fence"),
    ('Here: {"query": "q"}', "prose_around_json"),
    ('{"query": "q",}', "invalid_json"),
    ('["q"]', "invalid_json"),
])
def test_openai_argument_strings_near_misses(arguments, error_type):
    assert check(tool_calls=[openai_call("search", arguments)]).error_type == error_type


def test_openai_call_without_a_name_is_invalid_json():
    nameless = {"id": "x", "type": "function", "function": {"arguments": "{}"}}
    assert check(tool_calls=[nameless]).error_type == "invalid_json"


@pytest.mark.parametrize("content", [
    "The weather in Paris is sunny, 21 degrees.",
    "Use <b>bold</b> for emphasis; a set is written {1, 2}.",
    'Config example: {"debug": true}',
    "```python\nprint('hi')\n```",
    "I have a <tool> for that, but the answer is 4.",
])
def test_plain_text_is_valid_in_auto_mode(content):
    v = check(content=content)
    assert v == Verdict(True)


def test_a_json_string_holding_a_fence_is_not_a_fence():
    v = check(tool_calls=[openai_call("search", {"query": "```code```"})])
    assert v.valid


# ---- schema ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, arguments, error_type, in_detail", [
    ("get_wether", {"city": "x"}, "unknown_function", "get_weather"),
    ("fly", {}, "unknown_function", "fly"),
    ("get_weather", {"city": "x", "cty": "y"}, "unknown_parameter", "cty"),
    ("get_weather", {"unit": "celsius"}, "missing_required", "city"),
    ("get_weather", {"city": 3}, "type_mismatch", "string"),
    ("get_weather", {"city": "x", "days": "3"}, "type_mismatch", "integer"),
    ("get_weather", {"city": "x", "days": 3.5}, "type_mismatch", "integer"),
    ("get_weather", {"city": "x", "days": True}, "type_mismatch", "integer"),
    ("get_weather", {"city": "x", "ratio": "0.5"}, "type_mismatch", "number"),
    ("get_weather", {"city": "x", "unit": "kelvin"}, "enum_violation", "kelvin"),
    ("get_weather", {"city": "x", "stops": [{"name": "a", "minutes": "5"}]}, "type_mismatch", "stops[0].minutes"),
    ("get_weather", {"city": "x", "stops": [{"minutes": 5}]}, "missing_required", "name"),
    ("get_weather", {"city": "x", "stops": [{"name": "a", "note": 1}]}, "unknown_parameter", "note"),
    ("get_weather", {"city": "x", "stops": {"name": "a"}}, "type_mismatch", "array"),
])
def test_schema_errors_map_onto_the_taxonomy(name, arguments, error_type, in_detail):
    v = check(tool_calls=[openai_call(name, arguments)])
    assert (v.valid, v.error_type) == (False, error_type), v.detail
    assert in_detail in v.detail
    assert v.calls == (ParsedCall(name, arguments),)


def test_unknown_parameter_names_the_closest_real_one():
    v = check(tool_calls=[openai_call("get_weather", {"city": "x", "unti": "celsius"})])
    assert "did you mean 'unit'" in v.detail


def test_a_misspelt_required_parameter_is_reported_as_unknown_with_the_fix():
    v = check(tool_calls=[openai_call("get_weather", {"cityy": "x"})])
    assert v.error_type == "unknown_parameter" and "did you mean 'city'" in v.detail


def test_unknown_function_names_the_closest_real_one():
    assert "did you mean 'get_weather'" in check(content=hermes("get_wether", {"city": "x"})).detail


def test_extra_parameters_pass_where_the_schema_allows_them():
    assert check(tool_calls=[openai_call("search", {"query": "q", "page": 2})]).valid


def test_integer_valued_float_passes_as_integer_and_number_takes_ints():
    assert check(tool_calls=[openai_call("get_weather", {"city": "x", "days": 3.0, "ratio": 2})]).valid


def test_the_shallowest_error_wins():
    v = check(tool_calls=[openai_call("get_weather", {"days": "x", "stops": [{"minutes": "5"}]})])
    assert v.error_type == "missing_required"


def test_every_call_is_checked():
    v = check(content=hermes("search", {"query": "q"}) + hermes("get_weather", {"city": 1}))
    assert v.error_type == "type_mismatch" and len(v.calls) == 2


def test_an_invalid_schema_is_a_usage_error():
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "dict", "properties": {}}}}]
    with pytest.raises(UsageError, match="JSON Schema"):
        check(tool_calls=[openai_call("f", {})], tools=bad)


def test_tools_given_as_bare_functions_are_read():
    assert check(tool_calls=[openai_call("search", {"query": "q"})], tools=[SEARCH["function"]]).valid


# ---- call count -----------------------------------------------------------------------------------------

ONE = [openai_call("search", {"query": "q"})]
TWO = ONE + [openai_call("get_weather", {"city": "x"})]
FORCE_SEARCH = {"type": "function", "function": {"name": "search"}}
ALLOW_SEARCH = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
    {"type": "function", "function": {"name": "search"}}]}}


@pytest.mark.parametrize("tool_calls, content, tool_choice, parallel, valid", [
    (ONE, None, "none", None, False),
    (None, "plain answer", "none", None, True),
    (None, hermes("search", {"query": "q"}), "none", None, False),
    (None, "plain answer", "required", None, False),
    (ONE, None, "required", None, True),
    (TWO, None, "required", None, True),
    (ONE, None, FORCE_SEARCH, None, True),
    ([openai_call("get_weather", {"city": "x"})], None, FORCE_SEARCH, None, False),
    (TWO, None, FORCE_SEARCH, None, False),
    (None, "plain answer", FORCE_SEARCH, None, False),
    (TWO, None, "auto", False, False),
    (ONE, None, "auto", False, True),
    (TWO, None, "auto", True, True),
    (TWO, None, None, None, True),
    (None, "plain answer", None, None, True),
    (ONE, None, ALLOW_SEARCH, None, True),
    (None, "plain", ALLOW_SEARCH, None, False),
    (None, "plain", {**ALLOW_SEARCH, "allowed_tools": {**ALLOW_SEARCH["allowed_tools"], "mode": "auto"}}, None, True),
])
def test_call_count_follows_tool_choice_and_parallel_tool_calls(tool_calls, content, tool_choice, parallel, valid):
    v = check(content=content, tool_calls=tool_calls, tool_choice=tool_choice, parallel=parallel)
    assert v.valid is valid
    if not valid:
        assert v.error_type == "wrong_call_count", v.detail


def test_allowed_tools_restricts_which_tools_may_be_called():
    weather_only = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "get_weather"}}]}}
    v = check(tool_calls=ONE, tool_choice=weather_only)
    assert (v.valid, v.error_type) == (False, "unknown_function") and "allows (get_weather)" in v.detail


@pytest.mark.parametrize("choice", [
    "always",
    {"type": "function", "function": {"name": "nope"}},
    {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": []}},
    {"type": "allowed_tools", "allowed_tools": {"mode": "sometimes", "tools": [{"type": "function", "function": {"name": "search"}}]}},
])
def test_a_malformed_tool_choice_is_a_usage_error(choice):
    with pytest.raises(UsageError, match="tool_choice"):
        check(tool_calls=ONE, tool_choice=choice)


# ---- response_format ------------------------------------------------------------------------------------

PERSON = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "role": {"type": "string", "enum": ["admin", "user"]},
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age"],
    "additionalProperties": False,
}}}


def json_check(content, response_format=PERSON, tools=None):
    return check(content=content, tools=tools, tool_choice=None, response_format=response_format)


def test_json_schema_output_is_parsed_into_value():
    v = json_check('{"name": "Ada", "age": 36, "tags": ["math"]}')
    assert v == Verdict(True, None, None, (), {"name": "Ada", "age": 36, "tags": ["math"]})


@pytest.mark.parametrize("content, error_type", [
    ('```json\n{"name": "Ada", "age": 36}\n```', "markdown_fence"),
    ('Sure! {"name": "Ada", "age": 36}', "prose_around_json"),
    ('{"name": "Ada", "age": 36', "invalid_json"),
    ('{"name": "Ada"}', "missing_required"),
    ('{"name": "Ada", "age": 36, "email": "a@b"}', "unknown_parameter"),
    ('{"name": "Ada", "age": "36"}', "type_mismatch"),
    ('{"name": "Ada", "age": 36, "tags": [1]}', "type_mismatch"),
    ('{"name": "Ada", "age": 36, "role": "root"}', "enum_violation"),
    ("", "empty_output"),
])
def test_json_schema_near_misses(content, error_type):
    v = json_check(content)
    assert (v.valid, v.error_type) == (False, error_type), v.detail


def test_schema_failure_keeps_the_parsed_value():
    assert json_check('{"name": "Ada"}').value == {"name": "Ada"}


def test_json_object_mode_takes_any_object_only():
    assert json_check('{"anything": [1, 2]}', {"type": "json_object"}).value == {"anything": [1, 2]}
    assert json_check("[1, 2]", {"type": "json_object"}).error_type == "type_mismatch"
    assert json_check("hello", {"type": "json_object"}).error_type == "invalid_json"


def test_text_response_format_and_no_constraints_accept_any_text():
    assert json_check("hello", {"type": "text"}).valid
    assert check(content="hello", tools=None, tool_choice=None).valid
    assert check(content="", tools=None, tool_choice=None).error_type == "empty_output"


def test_tools_and_response_format_together():
    assert json_check('{"name": "Ada", "age": 1}', tools=TOOLS).valid
    v = check(content=hermes("search", {"query": "q"}), response_format=PERSON)
    assert v.valid and v.calls[0].name == "search"


def test_a_call_when_no_tools_were_offered_is_unknown_function():
    v = check(tool_calls=ONE, tools=None)
    assert v.error_type == "unknown_function" and "no tools" in v.detail


def test_content_parts_are_read_as_text():
    rest = hermes("search", {"query": "q"})[len("<tool_call>"):]
    v = check(content=[{"type": "text", "text": "<tool_call>"}, {"type": "text", "text": rest}])
    assert v.valid and v.calls == (ParsedCall("search", {"query": "q"}),)


# ---- parse_calls and the taxonomy ----------------------------------------------------------------------

def test_parse_calls_reads_without_checking_against_tools():
    v = parse_calls(content=hermes("anything", {"x": 1}), tool_calls=None)
    assert v.valid and v.calls == (ParsedCall("anything", {"x": 1}),)
    assert parse_calls(content="<tool_call/>", tool_calls=None).error_type == "self_closing_tag"
    assert parse_calls(content="plain", tool_calls=None) == Verdict(True)


def test_every_error_type_reported_is_in_the_taxonomy():
    assert len(set(ERROR_TYPES)) == 12
    samples = [check(content=c) for c in ("", "<tool_call/>", "<tool>{}</tool>", '<tool_call>{"name": 1}</tool_call>')]
    assert {v.error_type for v in samples} <= set(ERROR_TYPES)
