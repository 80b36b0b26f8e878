"""Scores for model outputs against references: exact match and Wilson intervals (from `app/metrics.py`, which the
Router's rollout uses too), BFCL's AST rule, argument and JSON F1, routing accuracy and workflow success. Pure
functions over plain data.

Normalisation (exact_match, arg_f1, json_f1): numbers compare by value (1 == 1.0), booleans are not numbers,
strings are stripped and their whitespace runs collapsed (case kept), dicts and lists recurse (list order kept).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from app.errors import UsageError
from app.metrics import Rate, exact_match, normalize_value, wilson  # noqa: F401  (the rules the Router also uses)
from app.validation import ParsedCall

# ---- F1 scores ------------------------------------------------------------------------------------------

def _f1(pred: Counter, ref: Counter) -> float:
    """F1 of two multisets: 2·|P∩R| / (|P|+|R|), the harmonic mean of precision and recall; both empty → 1.0."""
    total = sum(pred.values()) + sum(ref.values())
    return 1.0 if total == 0 else 2 * sum((pred & ref).values()) / total


def _call_triples(calls: Sequence[ParsedCall]) -> Counter:
    # Each call also counts once by name alone, so calling the wrong function without arguments still scores 0.
    triples: Counter = Counter()
    for call in calls:
        triples[(call.name, None, None)] += 1
        triples.update((call.name, k, normalize_value(v)) for k, v in call.arguments.items())
    return triples


def arg_f1(pred_calls: Sequence[ParsedCall], ref_calls: Sequence[ParsedCall]) -> float:
    """F1 over (function, parameter, normalised value) triples plus one (function,) entry per call.

    >>> arg_f1([ParsedCall("f", {"a": 1, "b": 2})], [ParsedCall("f", {"a": 1.0, "b": 3})])
    0.6666666666666666
    """
    return _f1(_call_triples(pred_calls), _call_triples(ref_calls))


def _flatten(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, Mapping) and value:
        return [pair for k, v in value.items() for pair in _flatten(v, (*path, str(k)))]
    if isinstance(value, (list, tuple)) and value:
        return [pair for i, v in enumerate(value) for pair in _flatten(v, (*path, i))]
    return [(path, normalize_value(value))]


def json_f1(pred_value: Any, ref_value: Any) -> float:
    """F1 over flattened (path, normalised leaf) pairs; list positions are part of the path.

    An empty object or list is a leaf of its own, so json_f1({}, {}) == 1.0 and json_f1({}, {"a": 1}) == 0.0.
    Pass None for an output that did not parse: it scores 0.0 unless the reference is null.
    """
    return _f1(Counter(_flatten(pred_value)), Counter(_flatten(ref_value)))


# ---- routing and workflows ------------------------------------------------------------------------------

def _as_set(item: str | Collection[str]) -> frozenset[str]:
    return frozenset([item]) if isinstance(item, str) else frozenset(item)


def _pairs(chosen: Sequence, expected: Sequence) -> list[tuple[frozenset, frozenset]]:
    if len(chosen) != len(expected):
        raise UsageError(f"routing metrics need one choice per expectation, got {len(chosen)} and {len(expected)}")
    return [(_as_set(c), _as_set(e)) for c, e in zip(chosen, expected)]


def routing_accuracy(chosen: Sequence[str | Collection[str]], expected: Sequence[str | Collection[str]]) -> float:
    """Share of items whose chosen set of agents equals the expected set; a str item is a one-agent set.

    >>> routing_accuracy([["retrieval", "processing"], "formatting"], [{"processing", "retrieval"}, "validation"])
    0.5
    """
    pairs = _pairs(chosen, expected)
    return sum(c == e for c, e in pairs) / len(pairs) if pairs else 0.0


def routing_jaccard(chosen: Sequence[str | Collection[str]], expected: Sequence[str | Collection[str]]) -> float:
    """Mean per-item Jaccard overlap |C∩E| / |C∪E| (partial credit); an item with both sets empty scores 1."""
    pairs = _pairs(chosen, expected)
    scores = [len(c & e) / len(c | e) if c | e else 1.0 for c, e in pairs]
    return sum(scores) / len(scores) if scores else 0.0


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def _strings(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


_CHECKS: dict[str, Callable[[str, Any], bool]] = {
    "contains": lambda answer, v: all(_fold(s) in _fold(answer) for s in _strings(v)),
    "contains_any": lambda answer, v: any(_fold(s) in _fold(answer) for s in _strings(v)),
    "not_contains": lambda answer, v: not any(_fold(s) in _fold(answer) for s in _strings(v)),
    "equals": lambda answer, v: _fold(answer) == _fold(v),
    "regex": lambda answer, v: re.search(v, answer) is not None,
}


def workflow_success(answer: str, check: Callable[[str], bool] | Mapping[str, Any]) -> bool:
    """Whether a workflow's final answer passes its check: a callable, or a spec dict whose keys must all hold.

    Spec keys: "contains" (every string appears), "contains_any" (one appears), "not_contains" (none appears),
    "equals" (the whole answer); these ignore case and whitespace runs. "regex" is searched as written (add
    `(?i)` for case-insensitive).

    >>> workflow_success("Paris is the capital.", {"contains": ["paris"], "regex": r"capital\\.$"})
    True
    """
    if callable(check):
        return bool(check(answer))
    if not check or set(check) - set(_CHECKS):
        raise UsageError(f"workflow check {dict(check)!r} needs keys among {sorted(_CHECKS)}")
    return all(_CHECKS[key](answer, value) for key, value in check.items())


# ---- BFCL's AST rule ------------------------------------------------------------------------------------

# What follows re-implements bfcl_eval/eval_checker/ast_eval/ast_checker.py (bfcl-eval 2026.3.23) for Python
# categories, quirks included, so scores equal the leaderboard's; tests/test_bfcl.py cross-checks it.
_BFCL_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
               "dict": dict, "any": str}


def bfcl_match(pred_calls: Sequence[ParsedCall], possible_answer: list[dict],
               functions: list[dict]) -> tuple[bool, str | None]:
    """BFCL's AST verdict on calls: (True, None) or (False, reason).

    `possible_answer` is BFCL's ground truth, one {function: {param: [allowed values]}} per expected call; `""`
    among the allowed values means the param may be left out. Strings compare after BFCL's standardisation
    (case, spaces and `,./-_*^` ignored), an int is accepted where a float is expected. Calls are matched to
    answers in any order, greedily as BFCL does; for one expected call this is BFCL's simple/multiple rule.
    Java/JavaScript categories need BFCL's own type converters and are not covered.
    """
    if len(pred_calls) != len(possible_answer):
        return False, f"wrong number of calls: {len(pred_calls)} made, {len(possible_answer)} expected"
    unmatched = list(range(len(pred_calls)))
    for answer in possible_answer:
        ((name, allowed),) = answer.items()
        spec = _bfcl_function(functions, name)
        reasons = [_bfcl_call_error(pred_calls[i], spec, allowed) for i in unmatched]
        if None not in reasons:
            return False, reasons[0]
        unmatched.pop(reasons.index(None))
    return True, None


def _bfcl_function(functions: list[dict], name: str) -> dict:
    for fn in functions:
        if fn["name"] == name:
            return fn
    raise UsageError(f"the possible answer names {name!r}, which is not among the item's functions")


def _bfcl_call_error(call: ParsedCall, spec: dict, allowed: dict) -> str | None:
    if call.name != spec["name"]:
        return f"called {call.name!r}, expected {spec['name']!r}"
    props = spec["parameters"].get("properties", {})
    for param in spec["parameters"].get("required", []):
        if param not in call.arguments:
            return f"missing required parameter {param!r}"
    for param, value in call.arguments.items():
        if param not in props or param not in allowed:
            return f"unexpected parameter {param!r}"
        if error := _bfcl_param_error(param, value, props[param], allowed[param]):
            return error
    for param, values in allowed.items():
        if param not in call.arguments and "" not in values:
            return f"parameter {param!r} left out but not optional"
    return None


def _bfcl_param_error(param: str, value: Any, prop: dict, allowed: list) -> str | None:
    bfcl_type = prop["type"]
    if bfcl_type not in _BFCL_TYPES:
        raise UsageError(f"BFCL type {bfcl_type!r} of {param!r} is not a Python category type; "
                         "bfcl_match covers Python categories only")
    expected = _BFCL_TYPES[bfcl_type]
    nested = _BFCL_TYPES.get(prop.get("items", {}).get("type")) if bfcl_type in ("array", "tuple") else None
    if bfcl_type == "tuple" and type(value) is tuple:
        value = list(value)
    if bfcl_type == "float" and type(value) is int:
        value = float(value)
    ok, is_variable = _bfcl_type_ok(value, allowed, expected, nested)
    if not ok:
        return f"{param!r}: {value!r} is not of type {bfcl_type}"
    if not is_variable and (checker := _bfcl_value_checker(expected, nested)):
        return checker(param, value, allowed)
    return None if value in allowed else f"{param!r}: {value!r} is not one of {allowed!r}"


def _bfcl_type_ok(value: Any, allowed: list, expected: type, nested: type | None) -> tuple[bool, bool]:
    """(type accepted, value is a 'variable'): BFCL accepts the type of the ground truth as a stand-in."""
    answer_type = next((type(a) for a in allowed if a != ""), None)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if nested is None or any(_bfcl_items_ok(value, a, nested) for a in allowed):
            return True, is_variable
        return False, False
    return (True, True) if answer_type is not None and type(value) is answer_type else (False, False)


def _bfcl_items_ok(items: list, answer: Any, nested: type) -> bool:
    # BFCL only checks item types against allowed values that are lists; any other allowed value passes.
    return type(answer) is not list or all(_bfcl_type_ok(item, answer, nested, None)[0] for item in items)


def _bfcl_value_checker(expected: type, nested: type | None) -> Callable | None:
    if expected is dict:
        return _bfcl_dict_error
    if expected is list:
        return _bfcl_list_dict_error if nested is dict else _bfcl_list_error
    return _bfcl_string_error if expected is str else None


def _standardize(text: str) -> str:
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _std(value: Any) -> Any:
    return _standardize(value) if type(value) is str else value


def _bfcl_string_error(param: str, value: str, allowed: list) -> str | None:
    options = [_standardize(a) for a in allowed if type(a) is str]
    return None if _standardize(value) in options else f"{param!r}: {value!r} is not one of {allowed!r}"


def _bfcl_list_error(param: str, value: list, allowed: list) -> str | None:
    # Iterating each allowed value as BFCL does: "" becomes [], so an empty list passes for an optional param.
    options = [[_std(x) for x in a] for a in allowed]
    return None if [_std(x) for x in value] in options else f"{param!r}: {value!r} is not one of {allowed!r}"


def _bfcl_dict_error(param: str, value: dict, allowed: list) -> str | None:
    error = f"{param!r}: no allowed dict to compare with"
    for answer in allowed:
        if answer != "":
            error = _bfcl_one_dict_error(param, value, answer)
            if error is None:
                return None
    return error


def _bfcl_one_dict_error(param: str, value: dict, answer: dict) -> str | None:
    for key, item in value.items():
        if key not in answer:
            return f"{param!r}: unexpected key {key!r}"
        if _std(item) not in [_std(a) for a in answer[key]]:
            return f"{param!r}: {key!r}={item!r} is not one of {answer[key]!r}"
    missing = [k for k, options in answer.items() if k not in value and "" not in options]
    return f"{param!r}: key {missing[0]!r} left out but not optional" if missing else None


def _bfcl_list_dict_error(param: str, value: list, allowed: list) -> str | None:
    error = f"{param!r}: no allowed list of dicts to compare with"
    for answer in allowed:
        if len(value) != len(answer):
            error = f"{param!r}: {len(value)} dicts, expected {len(answer)}"
            continue
        errors = (_bfcl_dict_error(param, item, [expected]) for item, expected in zip(value, answer))
        error = next((e for e in errors if e is not None), None)
        if error is None:
            return None
    return error
