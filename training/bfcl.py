"""The Berkeley Function Calling Leaderboard's single-turn categories, read from the installed `bfcl-eval` package
(its data files only; its model handlers are never imported), and its signatures as OpenAI tools.

to_openai_tools builds the schema that makes the best grammar for a small model. A probe on SmolLM2-135M,
BFCL simple_python, grammar-constrained: stripping defaults and forbidding extra properties moved exact match
from 52% to 70%. So:
- BFCL types become JSON Schema types: dict→object, float→number, tuple→array, integer, string, boolean,
  array (items converted too). `any` gets no type at all, although BFCL's Python checker wants a string there
  (a string or the ground truth's own type); unknown type names become string, as BFCL's own OpenAI handler does.
- An array's enum (BFCL puts it on the array) moves to its items.
- `default`, `optional` and other non-schema keys are dropped: a default tempts the model to copy it, and
  optional params stay optional simply by not being in `required`. Descriptions and enums are kept.
- Every object with declared properties gets `additionalProperties: false`, so the grammar cannot invent keys.
- Function names keep BFCL's dots (`math.factorial`): our grammars allow them, and the checker compares names.
- Java and JavaScript categories take every argument as a string (a Java/JS literal), as BFCL's checker requires.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import MissingDependency, UsageError
from app.validation import ParsedCall

_FILE = re.compile(r"^BFCL_v(?P<version>\d+)_(?P<name>.+)\.json$")
# Multi-turn, memory, web-search and format-sensitivity items have no per-item function list: not single-turn.
_NOT_SINGLE_TURN = ("multi_turn", "memory", "web_search", "format_sensitivity")


@dataclass(frozen=True)
class BfclItem:
    """One test: the chat messages of its single turn, BFCL's function signatures and its ground truth.

    `possible_answer` is one {function: {param: [allowed values]}} per expected call; it is [] in the
    irrelevance categories (the right answer is no call) and in live_relevance (any call is right).
    """

    id: str
    category: str
    messages: list[dict[str, Any]]
    functions: list[dict[str, Any]]
    possible_answer: list[dict[str, Any]]

    @property
    def language(self) -> str:
        return _language(self.category)


def data_dir() -> Path:
    """bfcl-eval's data folder, found without importing the package."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("bfcl-eval is not installed; run `pip install --no-deps bfcl-eval` "
                                "(only its data files and AST checker are used)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _category_files(folder: Path) -> dict[str, Path]:
    """Category name → newest-version file in a folder."""
    files: dict[str, tuple[int, Path]] = {}
    for path in folder.glob("BFCL_v*_*.json"):
        if (m := _FILE.match(path.name)) and int(m["version"]) >= files.get(m["name"], (-1, path))[0]:
            files[m["name"]] = (int(m["version"]), path)
    return {name: path for name, (_, path) in files.items()}


def categories() -> list[str]:
    """The single-turn categories, e.g. simple_python, multiple, parallel, live_simple, irrelevance."""
    return sorted(name for name in _category_files(data_dir()) if not name.startswith(_NOT_SINGLE_TURN))


def load_category(name: str, limit: int | None = None) -> list[BfclItem]:
    """The items of one category in file order (the first `limit` of them when given)."""
    if name not in categories():
        raise UsageError(f"unknown BFCL category {name!r}; choose one of: {', '.join(categories())}")
    entries = _read_jsonl(_category_files(data_dir())[name])[:limit]
    answer_file = _category_files(data_dir() / "possible_answer").get(name)
    answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(answer_file)} if answer_file else {}
    return [BfclItem(e["id"], name, e["question"][0], e["function"], answers.get(e["id"], [])) for e in entries]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _language(category: str) -> str:
    if "javascript" in category:
        return "javascript"
    return "java" if "java" in category else "python"


def reference_calls(possible_answer: list[dict]) -> list[ParsedCall]:
    """One call per expected call, each param at its first allowed value; a param whose first is "" is left out.

    >>> reference_calls([{"f": {"a": [1, 2], "b": ["", 3], "c": [{"k": ["x"], "o": [""]}]}}])
    [ParsedCall(name='f', arguments={'a': 1, 'c': {'k': 'x'}})]
    """
    return [ParsedCall(name, {k: _concrete(v) for k, v in _firsts(params).items()})
            for answer in possible_answer for name, params in answer.items()]


def _firsts(allowed: dict) -> dict:
    return {key: values[0] for key, values in allowed.items() if values and values[0] != ""}


def _concrete(value: Any) -> Any:
    # BFCL writes a dict argument's allowed value as {key: [allowed values]}, also inside a list of dicts; one
    # level only, as its checker compares anything deeper literally.
    if isinstance(value, dict):
        return _firsts(value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_firsts(v) for v in value]
    return value


# ---- signatures as OpenAI tools -------------------------------------------------------------------------

_JSON_TYPES = {"dict": "object", "object": "object", "float": "number", "number": "number", "double": "number",
               "tuple": "array", "array": "array", "list": "array", "integer": "integer", "int": "integer",
               "string": "string", "str": "string", "boolean": "boolean", "bool": "boolean"}


def to_openai_tools(functions: list[dict], *, language: str = "python") -> list[dict]:
    """BFCL function signatures → OpenAI tools whose parameters make a tight grammar (see the module docstring).

    >>> to_openai_tools([{"name": "math.factorial", "description": "n!", "parameters": {"type": "dict",
    ...     "properties": {"n": {"type": "integer", "default": 1}}, "required": ["n"]}}])[0]["function"]["parameters"]
    {'type': 'object', 'properties': {'n': {'type': 'integer'}}, 'required': ['n'], 'additionalProperties': False}
    """
    convert = _param_schema if language == "python" else _literal_schema
    return [{"type": "function", "function": {"name": fn["name"], "description": fn.get("description", ""),
                                              "parameters": _object_schema(fn.get("parameters") or {}, convert)}}
            for fn in functions]


def _object_schema(bfcl: dict, convert) -> dict:
    props = {name: convert(prop) for name, prop in (bfcl.get("properties") or {}).items()}
    required = [r for r in bfcl.get("required", []) if r in props] if isinstance(bfcl.get("required"), list) else []
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _param_schema(prop: dict) -> dict:
    out: dict[str, Any] = {"description": prop["description"]} if prop.get("description") else {}
    if prop.get("type") == "any":
        return out
    out["type"] = _JSON_TYPES.get(prop.get("type", "string"), "string")
    if out["type"] == "array" and isinstance(prop.get("items"), dict):
        out["items"] = _param_schema(prop["items"])
    if "enum" in prop:
        # BFCL sets an array's enum on the array itself, meaning its items'.
        target = out.setdefault("items", {}) if out["type"] == "array" else out
        target["enum"] = prop["enum"]
    if out["type"] == "object" and prop.get("properties"):
        out.update(_object_schema(prop, _param_schema))
    return out


def _literal_schema(prop: dict) -> dict:
    out = {"description": prop["description"]} if prop.get("description") else {}
    return {**out, "type": "string"}
