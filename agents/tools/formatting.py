"""Formatting tools: render a dataset as a markdown table, CSV or JSON, or write a short markdown report.

The full text goes into `ToolResult.artifact` (what the workflow hands the user); `content`, what the
model sees, is the same text cut to the usual length.
"""

from __future__ import annotations

import csv
import io
import json

from pydantic import Field

from agents.bounds import TABLE_CELL_CHARS, clip
from agents.tools.base import Args, Row, ToolContext, ToolResult, tool
from agents.tools.tables import columns_of, count, fmt, get_rows, require_columns
from app.errors import ToolError

DEFAULT_TABLE_ROWS = 20


class TableArgs(Args):
    dataset: str = Field(description="name of a saved dataset, e.g. q1")
    columns: list[str] | None = Field(None, description="columns to show; all when left out")
    max_rows: int | None = Field(None, ge=1, description="most rows to show")


class DatasetArgs(Args):
    dataset: str = Field(description="name of a saved dataset, e.g. q1")


class Section(Args):
    heading: str
    body: str


class ReportArgs(Args):
    title: str
    sections: list[Section] = Field(default_factory=list)
    dataset: str | None = Field(None, description="a dataset to show as a table at the end")


@tool(TableArgs)
def markdown_table(ctx: ToolContext, args: TableArgs) -> ToolResult:
    """Render a dataset as a markdown table."""
    rows = get_rows(ctx, args.dataset)
    columns = args.columns or columns_of(rows)
    require_columns(rows, args.dataset, *columns)
    return _artifact(render_table(rows, columns, args.max_rows or DEFAULT_TABLE_ROWS))


@tool(DatasetArgs)
def to_csv(ctx: ToolContext, args: DatasetArgs) -> ToolResult:
    """Render a dataset as CSV with a header row."""
    rows = get_rows(ctx, args.dataset)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns_of(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return _artifact(buffer.getvalue())


@tool(DatasetArgs)
def to_json(ctx: ToolContext, args: DatasetArgs) -> ToolResult:
    """Render a dataset as a JSON array of objects."""
    return _artifact(json.dumps(get_rows(ctx, args.dataset), ensure_ascii=False))


@tool(ReportArgs)
def report(ctx: ToolContext, args: ReportArgs) -> ToolResult:
    """Write a short markdown report: a title, sections of heading and body, and optionally a dataset's table."""
    if not args.title.strip():
        raise ToolError("title must not be empty; give the report a short title.")
    parts = [f"# {args.title.strip()}"]
    parts += [f"## {s.heading.strip()}\n\n{s.body.strip()}" for s in args.sections]
    if args.dataset:
        rows = get_rows(ctx, args.dataset)
        parts.append(render_table(rows, columns_of(rows), DEFAULT_TABLE_ROWS))
    return _artifact("\n\n".join(parts) + "\n")


def render_table(rows: list[Row], columns: list[str], max_rows: int) -> str:
    if not rows:
        return "(no rows)"
    lines = ["| " + " | ".join(map(_cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(fmt(row.get(c))) for c in columns) + " |" for row in rows[:max_rows]]
    if len(rows) > max_rows:
        lines.append(f"\n({count(len(rows) - max_rows, 'more row')} not shown)")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return clip(str(text), TABLE_CELL_CHARS, "cell").replace("|", "\\|").replace("\n", " ")


def _artifact(text: str) -> ToolResult:
    return ToolResult(ok=True, content=text, artifact=text)
