"""The per-run workspace of named tables (lists of row dicts): look-ups that explain a wrong name, storing
under a fresh name, ordering values of mixed types, and the short previews the model reads.
"""

from __future__ import annotations

from typing import Any

from agents.tools.base import Row, ToolContext
from app.errors import ToolError

PREVIEW_ROWS = 5


def get_rows(ctx: ToolContext, name: str) -> list[Row]:
    return ctx.datasets[resolve_name(ctx, name)]


def resolve_name(ctx: ToolContext, name: str) -> str:
    """The dataset `name` means: itself, or the one dataset an earlier step saved as `<task id>.<name>`
    (agents read bare names in earlier results; the workflow prefixes them so parallel tasks never collide)."""
    if name in ctx.datasets:
        return name
    matches = [known for known in ctx.datasets if known.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(ctx.datasets) or "none yet (run a query first)"
    raise ToolError(f"no dataset named '{name}'. Datasets: {known}.")


def columns_of(rows: list[Row]) -> list[str]:
    """Column names in first-seen order (rows from one query share keys; derived rows may add some)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def require_columns(rows: list[Row], dataset: str, *columns: str) -> None:
    known = columns_of(rows)
    for column in columns:
        if rows and column not in known:
            raise ToolError(f"no column '{column}' in dataset '{dataset}'. Columns: {', '.join(known)}.")


def store(ctx: ToolContext, rows: list[Row], as_name: str | None, prefix: str) -> str:
    """Save rows under as_name, or under the first free `<prefix><n>`; returns the name used."""
    name = (as_name or "").strip()
    if not name:
        n = 1
        while f"{prefix}{n}" in ctx.datasets:
            n += 1
        name = f"{prefix}{n}"
    ctx.datasets[name] = rows
    return name


def sort_key(value: Any) -> tuple[int, Any]:
    """Orders numbers before text and never compares a number with text."""
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, "" if value is None else str(value))


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"
    return str(value)


def describe(name: str, rows: list[Row], note: str = "") -> str:
    """`Saved as 'q1': 42 rows; columns: a, b` and a preview of the first rows."""
    head = f"Saved as '{name}': {count(len(rows), 'row')}{note}; columns: {', '.join(columns_of(rows))}"
    return head + "\n" + preview(rows)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def preview(rows: list[Row], limit: int = PREVIEW_ROWS) -> str:
    if not rows:
        return "(no rows)"
    columns = columns_of(rows)
    lines = [" | ".join(columns)]
    lines += [" | ".join(fmt(row.get(c))[:40] for c in columns) for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"... ({count(len(rows) - limit, 'more row')})")
    return "\n".join(lines)
