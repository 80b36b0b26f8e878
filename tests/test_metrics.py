"""Metrics: each rule and edge case by hand (BFCL's rule is also cross-checked with BFCL itself in test_bfcl)."""

import math

import pytest

from app.errors import UsageError
from app.validation import ParsedCall as C
from training.metrics import (
    Rate,
    arg_f1,
    bfcl_match,
    exact_match,
    json_f1,
    normalize_value,
    routing_accuracy,
    routing_jaccard,
    wilson,
    workflow_success,
)

# ---- exact match ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, equal", [
    (1, 1.0, True),
    (2.5, 2.5, True),
    (1, 2, False),
    (True, 1, False),
    (False, 0, False),
    (None, "null", False),
    ("  New   York ", "New York", True),
    ("new york", "New York", False),
    ("a\tb\nc", "a b c", True),
    ({"x": [1, {"y": " z "}]}, {"x": [1.0, {"y": "z"}]}, True),
    ([1, 2], [2, 1], False),
    ([1, 2], (1, 2), True),
    ({"a": 1}, {"a": 1, "b": None}, False),
])
def test_normalize_value(a, b, equal):
    assert (normalize_value(a) == normalize_value(b)) is equal


def test_exact_match_single_call():
    assert exact_match([C("f", {"a": 1, "b": " x "})], [C("f", {"b": "x", "a": 1.0})])
    assert not exact_match([C("f", {"a": 1})], [C("g", {"a": 1})])
    assert not exact_match([C("f", {"a": 1})], [C("f", {"a": 1, "b": 2})])
    assert not exact_match([C("f", {"a": 1})], [C("f", {"a": 2})])


def test_exact_match_is_an_order_free_multiset_match():
    a, b = C("f", {"x": 1}), C("f", {"x": 2})
    assert exact_match([a, b], [b, a])
    assert not exact_match([a, a], [a, b])
    assert not exact_match([a], [a, a])
    assert exact_match([], [])
    assert not exact_match([], [a])


# ---- F1 -------------------------------------------------------------------------------------------------

def test_arg_f1_counts_function_and_argument_triples():
    ref = [C("f", {"a": 1, "b": 2})]
    assert arg_f1(ref, ref) == 1.0
    assert arg_f1([C("f", {"a": 1.0, "b": 3})], ref) == pytest.approx(2 * 2 / 6)
    assert arg_f1([C("f", {"a": 1})], ref) == pytest.approx(2 * 2 / 5)  # precision 1, recall 2/3
    assert arg_f1([C("g", {"a": 1, "b": 2})], ref) == 0.0


def test_arg_f1_edge_cases():
    assert arg_f1([], []) == 1.0
    assert arg_f1([], [C("f", {"a": 1})]) == 0.0
    assert arg_f1([C("f", {})], []) == 0.0
    assert arg_f1([C("f", {})], [C("f", {})]) == 1.0
    assert arg_f1([C("g", {})], [C("f", {})]) == 0.0


def test_arg_f1_is_order_free_and_counts_duplicates():
    a, b = C("f", {"x": 1}), C("g", {"y": 2})
    assert arg_f1([b, a], [a, b]) == 1.0
    assert arg_f1([a, a], [a]) == pytest.approx(2 * 2 / 6)


def test_json_f1_over_flattened_paths():
    ref = {"name": "Ada", "langs": ["en", "fr"], "meta": {"age": 36}}
    assert json_f1(ref, ref) == 1.0
    assert json_f1({"name": " Ada ", "langs": ["en", "fr"], "meta": {"age": 36.0}}, ref) == 1.0
    assert json_f1({"name": "Ada", "langs": ["fr", "en"], "meta": {"age": 36}}, ref) == pytest.approx(2 * 2 / 8)
    assert json_f1({"name": "Ada"}, ref) == pytest.approx(2 * 1 / 5)
    assert json_f1({"name": "Ada", "extra": 1, "langs": ["en", "fr"], "meta": {"age": 36}}, ref) == pytest.approx(8 / 9)


def test_json_f1_edge_cases():
    assert json_f1({}, {}) == 1.0
    assert json_f1([], []) == 1.0
    assert json_f1(None, None) == 1.0
    assert json_f1({}, {"a": 1}) == 0.0
    assert json_f1(None, {"a": 1}) == 0.0
    assert json_f1("x", "x") == 1.0
    assert json_f1(1, 1.0) == 1.0
    assert json_f1({"a": {}}, {"a": {}}) == 1.0
    assert json_f1({"a": {}}, {"a": []}) == 0.0


# ---- Wilson ---------------------------------------------------------------------------------------------

def test_wilson_matches_the_textbook_values():
    r = wilson(7, 10)
    assert (r.k, r.n, r.rate) == (7, 10, 0.7)
    assert (round(r.low, 4), round(r.high, 4)) == (0.3968, 0.8922)
    r = wilson(50, 100)
    assert r.low == pytest.approx(0.4038, abs=1e-4) and r.high == pytest.approx(0.5962, abs=1e-4)


def test_wilson_edges():
    assert wilson(0, 0) == Rate(0, 0, 0.0, 0.0, 1.0)
    zero, full = wilson(0, 20), wilson(20, 20)
    assert zero.low == 0.0 and 0 < zero.high < 0.2
    assert full.high == pytest.approx(1.0) and 0.8 < full.low < 1.0
    assert wilson(5, 10, z=2.576).high - wilson(5, 10, z=2.576).low > wilson(5, 10).high - wilson(5, 10).low
    assert str(wilson(7, 10)) == "70.0% [39.7%, 89.2%] (7/10)"
    for bad in [(-1, 5), (6, 5)]:
        with pytest.raises(UsageError):
            wilson(*bad)


def test_wilson_interval_contains_the_rate_and_narrows_with_n():
    for k, n in [(1, 3), (30, 90), (300, 900)]:
        r = wilson(k, n)
        assert r.low <= r.rate <= r.high and not math.isnan(r.low)
    assert wilson(300, 900).high - wilson(300, 900).low < wilson(30, 90).high - wilson(30, 90).low


# ---- routing and workflows ------------------------------------------------------------------------------

def test_routing_accuracy_compares_sets_per_item():
    chosen = [["retrieval", "processing"], "formatting", ["validation"], []]
    expected = [{"processing", "retrieval"}, "validation", "validation", []]
    assert routing_accuracy(chosen, expected) == 0.75
    assert routing_accuracy([], []) == 0.0
    with pytest.raises(UsageError, match="one choice per expectation"):
        routing_accuracy(["a"], [])


def test_routing_jaccard_gives_partial_credit():
    assert routing_jaccard([["a", "b"]], [["a", "c"]]) == pytest.approx(1 / 3)
    assert routing_jaccard([["a"], []], [["a"], []]) == 1.0
    assert routing_jaccard(["a"], ["b"]) == 0.0


def test_workflow_success_with_a_callable():
    assert workflow_success("42", lambda a: a.strip() == "42")
    assert not workflow_success("41", lambda a: a.strip() == "42")


@pytest.mark.parametrize("check, passes", [
    ({"contains": ["paris", "FRANCE"]}, True),
    ({"contains": "Paris"}, True),
    ({"contains": ["paris", "berlin"]}, False),
    ({"contains_any": ["berlin", "paris"]}, True),
    ({"contains_any": ["berlin"]}, False),
    ({"not_contains": ["berlin"]}, True),
    ({"not_contains": ["capital"]}, False),
    ({"equals": "paris is the capital   of france."}, True),
    ({"regex": r"capital of \w+\.$"}, True),
    ({"regex": r"^paris"}, False),
    ({"regex": r"(?i)^paris"}, True),
    ({"contains": ["Paris"], "regex": "Berlin"}, False),
])
def test_workflow_success_spec(check, passes):
    assert workflow_success("Paris is the capital of France.", check) is passes


def test_workflow_success_rejects_unknown_or_empty_specs():
    for bad in [{"contain": ["x"]}, {}]:
        with pytest.raises(UsageError, match="contains"):
            workflow_success("x", bad)


# ---- BFCL's rule ----------------------------------------------------------------------------------------

FN = {"name": "trip.plan", "parameters": {"type": "dict", "properties": {
    "city": {"type": "string"},
    "days": {"type": "integer"},
    "budget": {"type": "float"},
    "pets": {"type": "boolean"},
    "stops": {"type": "array", "items": {"type": "string"}},
    "coords": {"type": "tuple", "items": {"type": "float"}},
    "prefs": {"type": "dict", "properties": {"food": {"type": "string"}, "seat": {"type": "string"}}},
    "legs": {"type": "array", "items": {"type": "dict"}},
    "note": {"type": "any"},
}, "required": ["city", "days"]}}
ANSWER = [{"trip.plan": {
    "city": ["New York", "NYC"], "days": [3], "budget": [1000.0, ""], "pets": [False, ""],
    "stops": [["Boston", "D.C."], ""], "coords": [[1.5, 2.0], ""],
    "prefs": [{"food": ["vegan"], "seat": ["window", ""]}, ""],
    "legs": [[{"from": ["NYC"], "to": ["Boston"]}], ""], "note": ["", "hi"],
}}]


def bfcl(args, answer=ANSWER, functions=(FN,), name="trip.plan"):
    return bfcl_match([C(name, args)], answer, list(functions))


@pytest.mark.parametrize("args, ok", [
    ({"city": "New York", "days": 3}, True),
    ({"city": "nyc", "days": 3}, True),
    ({"city": "new-york", "days": 3}, True),
    ({"city": "NEW YORK.", "days": 3}, True),
    ({"city": "Boston", "days": 3}, False),
    ({"city": "New York"}, False),
    ({"days": 3}, False),
    ({"city": "New York", "days": 3.0}, False),
    ({"city": "New York", "days": "3"}, False),
    ({"city": "New York", "days": True}, False),
    ({"city": "New York", "days": 3, "budget": 1000}, True),
    ({"city": "New York", "days": 3, "budget": 1000.0}, True),
    ({"city": "New York", "days": 3, "budget": 999.5}, False),
    ({"city": "New York", "days": 3, "pets": False}, True),
    ({"city": "New York", "days": 3, "pets": 0}, False),
    ({"city": "New York", "days": 3, "stops": ["boston", "dc"]}, True),
    ({"city": "New York", "days": 3, "stops": ["D.C.", "Boston"]}, False),
    ({"city": "New York", "days": 3, "stops": []}, True),
    ({"city": "New York", "days": 3, "coords": [1.5, 2.0]}, True),
    ({"city": "New York", "days": 3, "coords": (1.5, 2.0)}, True),
    # BFCL's quirk: "" among the allowed values skips the item type check, and 2 == 2.0 then matches.
    ({"city": "New York", "days": 3, "coords": [1.5, 2]}, True),
    ({"city": "New York", "days": 3, "prefs": {"food": "Vegan"}}, True),
    ({"city": "New York", "days": 3, "prefs": {"seat": "window"}}, False),
    ({"city": "New York", "days": 3, "prefs": {"food": "vegan", "drink": "tea"}}, False),
    ({"city": "New York", "days": 3, "legs": [{"from": "nyc", "to": "boston"}]}, True),
    ({"city": "New York", "days": 3, "legs": [{"from": "NYC"}]}, False),
    ({"city": "New York", "days": 3, "legs": []}, True),
    ({"city": "New York", "days": 3, "note": "HI"}, True),
    ({"city": "New York", "days": 3, "note": 5}, False),
    ({"city": "New York", "days": 3, "extra": 1}, False),
])
def test_bfcl_rule(args, ok):
    verdict, reason = bfcl(args)
    assert verdict is ok
    assert (reason is None) is ok


def test_bfcl_wrong_function_name_and_count():
    assert bfcl({"city": "NYC", "days": 3}, name="trip_plan")[0] is False
    assert bfcl_match([], ANSWER, [FN]) == (False, "wrong number of calls: 0 made, 1 expected")
    two = [C("trip.plan", {"city": "NYC", "days": 3})] * 2
    assert bfcl_match(two, ANSWER, [FN])[0] is False


def test_bfcl_optional_param_not_in_answer_is_unexpected():
    answer = [{"trip.plan": {"city": ["NYC"], "days": [3]}}]
    assert bfcl({"city": "NYC", "days": 3}, answer)[0]
    assert bfcl({"city": "NYC", "days": 3, "pets": False}, answer) == (False, "unexpected parameter 'pets'")


def test_bfcl_variable_rule_accepts_the_ground_truths_type():
    # A ground truth that names a variable ("data") for an array param: BFCL then accepts a string, compared as is.
    answer = [{"trip.plan": {"city": ["NYC"], "days": [3], "stops": ["data"]}}]
    assert bfcl({"city": "NYC", "days": 3, "stops": "data"}, answer)[0]
    assert not bfcl({"city": "NYC", "days": 3, "stops": "DATA"}, answer)[0]


def test_bfcl_item_types_are_checked_against_list_answers():
    answer = [{"trip.plan": {"city": ["NYC"], "days": [3], "coords": [[1.5, 2.0]]}}]
    assert bfcl({"city": "NYC", "days": 3, "coords": [1.5, 2.0]}, answer)[0]
    assert not bfcl({"city": "NYC", "days": 3, "coords": [1.5, 2]}, answer)[0]
    assert not bfcl({"city": "NYC", "days": 3, "coords": ["1.5", 2.0]}, answer)[0]


def test_bfcl_parallel_calls_match_in_any_order():
    fn = {"name": "play", "parameters": {"type": "dict", "properties": {
        "artist": {"type": "string"}, "minutes": {"type": "integer"}}, "required": ["artist"]}}
    answer = [{"play": {"artist": ["Taylor Swift"], "minutes": [20]}},
              {"play": {"artist": ["Maroon 5"], "minutes": [15, ""]}}]
    a, b = C("play", {"artist": "taylor swift", "minutes": 20}), C("play", {"artist": "Maroon 5"})
    assert bfcl_match([a, b], answer, [fn]) == (True, None)
    assert bfcl_match([b, a], answer, [fn]) == (True, None)
    assert bfcl_match([a, a], answer, [fn])[0] is False


def test_bfcl_match_needs_python_types_and_known_functions():
    java = {"name": "f", "parameters": {"type": "dict", "properties": {"m": {"type": "HashMap"}}, "required": []}}
    with pytest.raises(UsageError, match="Python"):
        bfcl_match([C("f", {"m": "x"})], [{"f": {"m": ["x"]}}], [java])
    with pytest.raises(UsageError, match="not among"):
        bfcl_match([C("g", {})], [{"g": {}}], [FN])
