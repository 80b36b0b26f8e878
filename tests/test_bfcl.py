"""BFCL loading, signatures as tools, and our bfcl_match against BFCL's own checker on real items."""

import json

import pytest
from jsonschema import Draft202012Validator

from app.errors import UsageError
from app.validation import ParsedCall, validate_output
from tests.support.requires import require
from training.bfcl import BfclItem, categories, load_category, reference_calls, to_openai_tools
from training.metrics import bfcl_match

require("bfcl_eval")

from tests.support.bfcl_judge import bfcl_ast_check  # noqa: E402

PYTHON_CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                     "live_parallel", "live_parallel_multiple"]


# ---- loading --------------------------------------------------------------------------------------------

def test_categories_are_the_single_turn_ones():
    names = categories()
    assert set(PYTHON_CATEGORIES) | {"simple_java", "simple_javascript", "irrelevance"} <= set(names)
    assert not [n for n in names if n.startswith(("multi_turn", "memory", "web_search", "format_sensitivity"))]


def test_unknown_category_lists_the_real_ones():
    with pytest.raises(UsageError, match="simple_python"):
        load_category("simple_pyton")


def test_load_category_reads_messages_functions_and_answers():
    items = load_category("simple_python", limit=3)
    assert [i.id for i in items] == ["simple_python_0", "simple_python_1", "simple_python_2"]
    first = items[0]
    assert isinstance(first, BfclItem) and first.language == "python" and first.category == "simple_python"
    assert first.messages[0]["role"] == "user" and "triangle" in first.messages[0]["content"]
    assert first.functions[0]["name"] == "calculate_triangle_area"
    assert first.possible_answer == [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]
    assert len(load_category("simple_python")) == 400


def test_categories_without_ground_truth_load_with_empty_answers():
    item = load_category("irrelevance", limit=1)[0]
    assert item.possible_answer == [] and item.functions
    assert load_category("simple_java", limit=1)[0].language == "java"
    assert load_category("simple_javascript", limit=1)[0].language == "javascript"


def test_reference_calls_take_the_first_allowed_value_and_skip_optional():
    answer = [{"f": {"a": [1, 2], "b": ["", 3], "c": [{"k": ["x", "y"], "o": [""]}], "d": [[{"k": ["z"]}]]}},
              {"g": {}}]
    assert reference_calls(answer) == [ParsedCall("f", {"a": 1, "c": {"k": "x"}, "d": [{"k": "z"}]}),
                                       ParsedCall("g", {})]


# ---- signatures as tools --------------------------------------------------------------------------------

BFCL_FN = {"name": "geo.distance", "description": "Distance.", "parameters": {"type": "dict", "properties": {
    "points": {"type": "array", "items": {"type": "tuple", "items": {"type": "float"}}, "description": "Points."},
    "unit": {"type": "string", "enum": ["km", "mi"], "default": "km", "optional": True},
    "precision": {"type": "integer", "default": 2},
    "scale": {"type": "float"},
    "flags": {"type": "array", "items": {"type": "string"}, "enum": ["a", "b"]},
    "options": {"type": "dict", "properties": {"fast": {"type": "boolean"}}, "required": ["fast"]},
    "extra": {"type": "dict"},
    "anything": {"type": "any", "description": "Whatever."},
    "odd": {"type": "HashSet"},
}, "required": ["points", "precision", "ghost"]}}


def test_to_openai_tools_makes_a_tight_schema():
    (tool,) = to_openai_tools([BFCL_FN])
    assert tool["type"] == "function" and tool["function"]["name"] == "geo.distance"
    params = tool["function"]["parameters"]
    assert params["type"] == "object" and params["additionalProperties"] is False
    assert params["required"] == ["points", "precision"]
    props = params["properties"]
    assert props["points"] == {"description": "Points.", "type": "array",
                               "items": {"type": "array", "items": {"type": "number"}}}
    assert props["unit"] == {"type": "string", "enum": ["km", "mi"]}
    assert props["precision"] == {"type": "integer"} and props["scale"] == {"type": "number"}
    assert props["flags"] == {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}}
    assert props["options"] == {"type": "object", "properties": {"fast": {"type": "boolean"}},
                                "required": ["fast"], "additionalProperties": False}
    assert props["extra"] == {"type": "object"}
    assert props["anything"] == {"description": "Whatever."}
    assert props["odd"] == {"type": "string"}
    assert "default" not in json.dumps(tool)


def test_java_and_javascript_arguments_are_strings():
    item = load_category("simple_java", limit=1)[0]
    params = to_openai_tools(item.functions, language="java")[0]["function"]["parameters"]
    assert {p["type"] for p in params["properties"].values()} == {"string"}


@pytest.mark.parametrize("category", PYTHON_CATEGORIES + ["simple_java", "irrelevance"])
def test_every_converted_signature_is_valid_json_schema(category):
    for item in load_category(category, limit=100):
        for tool in to_openai_tools(item.functions, language=item.language):
            Draft202012Validator.check_schema(tool["function"]["parameters"])


def test_ground_truth_passes_our_validation_under_the_converted_tools():
    for item in load_category("simple_python", limit=50):
        calls = [{"type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                 for c in reference_calls(item.possible_answer)]
        verdict = validate_output(content=None, tool_calls=calls, tools=to_openai_tools(item.functions),
                                  tool_choice="required", response_format=None, parallel_tool_calls=None)
        assert verdict.valid, (item.id, verdict.detail)


# ---- agreement with BFCL's checker ----------------------------------------------------------------------

def _wrong_value(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1.5 if isinstance(v, float) else v + 1
    if isinstance(v, str):
        return v + " zzz"
    if isinstance(v, list):
        return v + v[:1] if v else [1]
    if isinstance(v, dict):
        return {**v, "zz": 1}
    return "x"


def _wrong_type(v):
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return 42
    if isinstance(v, list):
        return json.dumps(v)
    if isinstance(v, dict):
        return [v]
    return 0


def _sibling_values(v):
    """Values BFCL may or may not accept: other spellings, int/float swaps, tuples."""
    if isinstance(v, str):
        return [v.upper(), v + ".", f" {v}-"]
    if isinstance(v, float) and v.is_integer():
        return [int(v)]
    if isinstance(v, int) and not isinstance(v, bool):
        return [float(v)]
    if isinstance(v, list):
        return [tuple(v), [x.upper() if isinstance(x, str) else x for x in v]]
    return []


def _replace(calls, i, arguments=None, name=None):
    call = calls[i]
    new = ParsedCall(name or call.name, call.arguments if arguments is None else arguments)
    return calls[:i] + [new] + calls[i + 1:]


def perturbations(item):
    """(label, calls) pairs: the ground truth and systematic near misses of it."""
    calls = reference_calls(item.possible_answer)
    out = [("ground truth", calls), ("no calls", []), ("duplicate", calls + calls[:1]), ("reversed", calls[::-1])]
    for i, call in enumerate(calls):
        allowed = item.possible_answer[i][call.name]
        props = next(f for f in item.functions if f["name"] == call.name)["parameters"]["properties"]
        out.append(("wrong name", _replace(calls, i, name=call.name + "_v2")))
        out.append(("extra param", _replace(calls, i, {**call.arguments, "unexpected_extra": 1})))
        for p in set(props) - set(call.arguments):
            out.append((f"optional {p} added", _replace(calls, i, {**call.arguments, p: "x"})))
        for p in set(allowed) - set(call.arguments):
            for value in allowed[p][1:2]:
                out.append((f"{p} second allowed", _replace(calls, i, {**call.arguments, p: value})))
        for p, v in call.arguments.items():
            rest = {k: x for k, x in call.arguments.items() if k != p}
            out.append((f"{p} dropped", _replace(calls, i, rest)))
            out.append((f"{p} wrong value", _replace(calls, i, {**rest, p: _wrong_value(v)})))
            out.append((f"{p} wrong type", _replace(calls, i, {**rest, p: _wrong_type(v)})))
            out += [(f"{p} sibling {s!r}", _replace(calls, i, {**rest, p: s})) for s in _sibling_values(v)]
            out += [(f"{p} allowed {a!r}", _replace(calls, i, {**rest, p: a})) for a in allowed[p][1:] if a != ""]
    return out


def _agreement(category, limit):
    disagreements, verdicts = [], []
    for item in load_category(category, limit=limit):
        for label, calls in perturbations(item):
            ours, _ = bfcl_match(calls, item.possible_answer, item.functions)
            theirs = bfcl_ast_check(item.functions, calls, item.possible_answer, category)
            verdicts.append((label, theirs))
            if ours != theirs:
                disagreements.append((item.id, label, ours, theirs))
    return disagreements, verdicts


def test_bfcl_match_agrees_with_bfcl_on_the_first_50_simple_python_items():
    disagreements, verdicts = _agreement("simple_python", 50)
    assert disagreements == []
    truths = [ok for label, ok in verdicts if label == "ground truth"]
    assert len(truths) == 50 and all(truths)
    # The perturbations must exercise both verdicts, or agreement would prove little.
    assert sum(not ok for _, ok in verdicts) > 300 and sum(ok for _, ok in verdicts) > 150


@pytest.mark.parametrize("category", PYTHON_CATEGORIES[1:])
def test_bfcl_match_agrees_with_bfcl_on_other_python_categories(category):
    disagreements, verdicts = _agreement(category, 25)
    assert disagreements == []
    assert any(ok for _, ok in verdicts) and any(not ok for _, ok in verdicts)


def test_the_judge_really_is_bfcls_checker():
    item = load_category("simple_python", limit=1)[0]
    good = [{"calculate_triangle_area": {"base": 10, "height": 5}}]
    assert bfcl_ast_check(item.functions, good, item.possible_answer, "simple_python")
    assert not bfcl_ast_check(item.functions, [{"calculate_triangle_area": {"base": 10}}], item.possible_answer,
                              "simple_python")
    import sys

    assert "bfcl_eval.constants.model_config" not in sys.modules
