"""Processing tools: filter, aggregate, sort, top-k and derived columns over the run's datasets.

Each tool reads one dataset and saves its result as a new one (named by `as_name`, or `<kind><n>`), so
earlier results stay available and every step can be checked.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field

from agents.tools.base import Args, Row, ToolContext, ToolResult, tool
from agents.tools.expr import compile_expression
from agents.tools.tables import columns_of, describe, get_rows, require_columns, sort_key, store
from app.errors import ToolError

Op = Literal["=", "!=", ">", ">=", "<", "<=", "contains"]
Fn = Literal["sum", "avg", "min", "max", "count"]
Dataset = Annotated[str, Field(description="name of a saved dataset, e.g. q1")]
AsName = Annotated[str | None, Field(description="name to save the result under")]


class FilterArgs(Args):
    dataset: Dataset
    column: str
    op: Op
    value: str | float
    as_name: AsName = None


class Metric(Args):
    column: str = Field(description="column to aggregate, or * with count")
    fn: Fn


class AggregateArgs(Args):
    dataset: Dataset
    group_by: list[str] = Field(default_factory=list, description="columns to group by; empty for one total")
    metrics: list[Metric] = Field(min_length=1)
    as_name: AsName = None


class SortArgs(Args):
    dataset: Dataset
    by: str
    descending: bool = False
    as_name: AsName = None


class TopKArgs(Args):
    dataset: Dataset
    by: str
    k: int = Field(ge=1)
    as_name: AsName = None


class DeriveArgs(Args):
    dataset: Dataset
    name: str = Field(description="the new column's name")
    expression: str = Field(description="arithmetic over columns, e.g. amount / quantity")
    as_name: AsName = None


@tool(FilterArgs)
def filter_rows(ctx: ToolContext, args: FilterArgs) -> ToolResult:
    """Keep the rows where `column op value` holds (= and != ignore case for text; contains is a substring test)."""
    rows = get_rows(ctx, args.dataset)
    require_columns(rows, args.dataset, args.column)
    kept = [row for row in rows if _matches(row.get(args.column), args.op, args.value)]
    return _saved(ctx, kept, args.as_name, "filtered")


@tool(AggregateArgs)
def aggregate(ctx: ToolContext, args: AggregateArgs) -> ToolResult:
    """Group rows by columns and compute sum, avg, min, max or count per group (result columns like sum_amount)."""
    rows = get_rows(ctx, args.dataset)
    require_columns(rows, args.dataset, *args.group_by, *(m.column for m in args.metrics if m.column != "*"))
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(c) for c in args.group_by), []).append(row)
    out = []
    for key in sorted(groups, key=lambda k: [sort_key(v) for v in k]):
        result = dict(zip(args.group_by, key))
        for metric in args.metrics:
            result[_metric_name(metric)] = _apply(metric, groups[key])
        out.append(result)
    return _saved(ctx, out, args.as_name, "agg")


@tool(SortArgs)
def sort_rows(ctx: ToolContext, args: SortArgs) -> ToolResult:
    """Sort the rows by one column (empty values last)."""
    rows = get_rows(ctx, args.dataset)
    require_columns(rows, args.dataset, args.by)
    return _saved(ctx, _sorted(rows, args.by, args.descending), args.as_name, "sorted")


@tool(TopKArgs)
def top_k(ctx: ToolContext, args: TopKArgs) -> ToolResult:
    """Keep the k rows with the largest values in one column."""
    rows = get_rows(ctx, args.dataset)
    require_columns(rows, args.dataset, args.by)
    return _saved(ctx, _sorted(rows, args.by, descending=True)[: args.k], args.as_name, "top")


@tool(DeriveArgs)
def derive_column(ctx: ToolContext, args: DeriveArgs) -> ToolResult:
    """Add a column computed from others with + - * / and parentheses, e.g. amount / quantity."""
    rows = get_rows(ctx, args.dataset)
    if not args.name.strip():
        raise ToolError("name must be the new column's name, e.g. price_each.")
    evaluate = compile_expression(args.expression, columns_of(rows))
    out = [{**row, args.name: _round(evaluate(row))} for row in rows]
    return _saved(ctx, out, args.as_name, "derived")


def _saved(ctx: ToolContext, rows: list[Row], as_name: str | None, prefix: str) -> ToolResult:
    name = store(ctx, rows, as_name, prefix)
    return ToolResult(ok=True, content=describe(name, rows), dataset=name)


def _matches(cell: Any, op: str, value: str | float) -> bool:
    if cell is None:
        return op == "!="
    if op == "contains":
        return str(value).lower() in str(cell).lower()
    left, right = _comparable(cell, value)
    if op in ("=", "!="):
        return (left == right) == (op == "=")
    try:
        return {">": left > right, ">=": left >= right, "<": left < right, "<=": left <= right}[op]
    except TypeError:
        return False


def _comparable(cell: Any, value: str | float) -> tuple[Any, Any]:
    """Compare numbers as numbers ("100" matches 100) and text without regard to case."""
    if isinstance(cell, (int, float)):
        try:
            return cell, float(value)
        except ValueError:
            return str(cell), str(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # the model sent 2025 for a text column: compare as "2025", not "2025.0"
    return str(cell).lower(), str(value).lower()


def _metric_name(metric: Metric) -> str:
    return "count" if metric.column == "*" else f"{metric.fn}_{metric.column}"


def _apply(metric: Metric, rows: list[Row]) -> Any:
    if metric.column == "*":
        if metric.fn != "count":
            raise ToolError(f"column '*' only works with count, not {metric.fn}; name a column.")
        return len(rows)
    values = [row.get(metric.column) for row in rows if row.get(metric.column) is not None]
    if metric.fn == "count":
        return len(values)
    if metric.fn in ("min", "max"):
        return (min if metric.fn == "min" else max)(values, key=sort_key, default=None)
    if any(isinstance(v, (str, bool)) or not isinstance(v, (int, float)) for v in values):
        raise ToolError(f"column '{metric.column}' holds text; {metric.fn} needs numbers (use count, min or max).")
    if not values:
        return None
    exact = all(isinstance(v, int) for v in values)
    try:
        total = sum(values) if exact else math.fsum(values)  # fsum: the sum of 5,000 prices has no drift
    except OverflowError:
        total = math.inf
    if not exact and not math.isfinite(total):
        raise ToolError(f"the {metric.fn} of '{metric.column}' is not a finite number (a value passed 1e308); "
                        "scale the column down with derive_column first.")
    if metric.fn == "sum":
        return total if exact else _round(total)
    return _round(total / len(values))


def _sorted(rows: list[Row], column: str, descending: bool) -> list[Row]:
    present = [row for row in rows if row.get(column) is not None]
    missing = [row for row in rows if row.get(column) is None]
    return sorted(present, key=lambda row: sort_key(row[column]), reverse=descending) + missing


def _round(value: float | None) -> float | None:
    """Strip float noise (0.1 + 0.2) from results the model and the user will read."""
    return None if value is None else round(value, 6)
