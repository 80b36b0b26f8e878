"""Validation tools: check a JSON value against a schema, a column against a range, a dataset for rows.

A check that runs returns ok=True and content starting with `PASS:` or `FAIL:` plus the specifics;
ok=False is kept for calls that could not run (a wrong dataset name, a schema that does not parse).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import jsonschema
from referencing.exceptions import Unresolvable
from pydantic import Field

from agents.tools.base import Args, ToolContext, ToolResult, tool
from agents.tools.tables import fmt, get_rows, require_columns
from app.errors import ToolError

MAX_LISTED = 5


class SchemaArgs(Args):
    value_json: str = Field(description="the JSON value to check, as a string")
    # the alias keeps the name the model sees while not shadowing pydantic's deprecated BaseModel.schema_json
    schema_text: str = Field(alias="schema_json", description="the JSON schema, as a string")


class RangeArgs(Args):
    dataset: str = Field(description="name of a saved dataset, e.g. q1")
    column: str
    min: float | None = None
    max: float | None = None


class NotEmptyArgs(Args):
    dataset: str = Field(description="name of a saved dataset, e.g. q1")


@tool(SchemaArgs)
def validate_json_schema(ctx: ToolContext, args: SchemaArgs) -> ToolResult:
    """Check that a JSON value matches a JSON schema; lists where it does not."""
    value, schema = _load(args.value_json, "value_json"), _load(args.schema_text, "schema_json")
    if not isinstance(schema, (dict, bool)):
        raise ToolError('schema_json must be a JSON object, e.g. {"type": "object"}.')
    try:
        errors = sorted(_validator(schema).iter_errors(value), key=lambda e: e.json_path)
    except jsonschema.SchemaError as exc:
        raise ToolError(f"schema_json is not a valid JSON schema: {exc.message}.") from None
    except Unresolvable as exc:
        raise ToolError(f"schema_json has a $ref that cannot be resolved ({exc}); "
                        "inline the referenced schema.") from None
    if not errors:
        return _verdict(True, "the value matches the schema")
    problems = [f"at {e.json_path}: {e.message[:120]}" for e in errors[:MAX_LISTED]]
    return _verdict(False, f"{len(errors)} problem(s): " + "; ".join(problems))


@tool(RangeArgs)
def check_range(ctx: ToolContext, args: RangeArgs) -> ToolResult:
    """Check that every value of a numeric column lies within min and max (inclusive)."""
    if args.min is None and args.max is None:
        raise ToolError("give min, max or both, e.g. {\"min\": 0}.")
    rows = get_rows(ctx, args.dataset)
    require_columns(rows, args.dataset, args.column)
    bad = [(i, row.get(args.column)) for i, row in enumerate(rows) if not _within(row.get(args.column), args)]
    bounds = f"[{_bound(args.min)}, {_bound(args.max)}]"
    if not bad:
        return _verdict(True, f"all {len(rows)} values of {args.column} are within {bounds}")
    listed = ", ".join(f"row {i}: {fmt(v) or 'empty'}" for i, v in bad[:MAX_LISTED])
    return _verdict(False, f"{len(bad)} of {len(rows)} values of {args.column} are outside {bounds} or "
                           f"not numbers ({listed})")


@tool(NotEmptyArgs)
def check_not_empty(ctx: ToolContext, args: NotEmptyArgs) -> ToolResult:
    """Check that a dataset has at least one row."""
    rows = get_rows(ctx, args.dataset)
    if rows:
        return _verdict(True, f"'{args.dataset}' has {len(rows)} rows")
    return _verdict(False, f"'{args.dataset}' has no rows; the query or filter that built it matched nothing")


def _validator(schema: dict[str, Any] | bool) -> jsonschema.protocols.Validator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # an unknown $schema falls back to the latest draft
        cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _load(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolError(f"{field} is not valid JSON ({exc.msg} at char {exc.pos}).") from None


def _within(value: Any, args: RangeArgs) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (args.min is None or value >= args.min) and (args.max is None or value <= args.max)


def _bound(value: float | None) -> str:
    return "any" if value is None else fmt(value)


def _verdict(passed: bool, detail: str) -> ToolResult:
    return ToolResult(ok=True, content=("PASS: " if passed else "FAIL: ") + detail)
