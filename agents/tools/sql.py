"""Retrieval tools: read-only SQL over the run's SQLite database.

Read-only is enforced twice, neither by pattern matching alone: the file is opened with `mode=ro`, and an
authorizer lets the statement only read tables and call functions. A query is cut off after a fixed amount
of work, so a runaway join or recursive CTE cannot stall the run.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from pydantic import Field

from agents.tools.base import Args, Row, ToolContext, ToolResult, tool
from agents.tools.tables import describe, preview, store
from app.errors import ToolError

WORK_LIMIT = 50_000_000  # SQLite VM steps; a full scan of the sample sales view takes under 1M
_STEP = 10_000
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*(\w*)", re.S)


class NoArgs(Args):
    pass


class DescribeArgs(Args):
    table: str = Field(description="table or view name, e.g. sales")


class SqlArgs(Args):
    query: str = Field(description="one SQLite SELECT statement")
    limit: int | None = Field(None, ge=1, description="most rows to return")
    as_name: str | None = Field(None, description="name to save the result under")


@tool(NoArgs)
def list_tables(ctx: ToolContext, args: NoArgs) -> ToolResult:
    """List the tables and views of the database with their columns."""
    with closing(_connect(ctx)) as conn:
        lines = [f"{name} ({kind}): {', '.join(_columns(conn, name))}" for name, kind in _tables(conn)]
    return ToolResult(ok=True, content="\n".join(lines) or "the database has no tables")


@tool(DescribeArgs)
def describe_table(ctx: ToolContext, args: DescribeArgs) -> ToolResult:
    """Show the columns, types, row count and sample rows of one table or view."""
    with closing(_connect(ctx)) as conn:
        names = {name.lower(): name for name, _ in _tables(conn)}
        table = names.get(args.table.strip().strip('"`[]').lower())
        if table is None:
            raise ToolError(f"no table '{args.table}'. Tables: {', '.join(names.values())}.")
        quoted = '"' + table.replace('"', '""') + '"'
        info = conn.execute(f"PRAGMA table_info({quoted})").fetchall()
        count = conn.execute(f"SELECT count(*) FROM {quoted}").fetchone()[0]
        sample = _fetch(conn.execute(f"SELECT * FROM {quoted} LIMIT 3"), 3)[0]
    columns = ", ".join(f"{col[1]} {col[2] or 'ANY'}" for col in info)
    return ToolResult(ok=True, content=f"{table}: {count} rows\ncolumns: {columns}\n{preview(sample)}")


@tool(SqlArgs)
def run_sql(ctx: ToolContext, args: SqlArgs) -> ToolResult:
    """Run one read-only SQLite SELECT (or WITH ... SELECT) and save the rows as a dataset for later tools."""
    query = _single_select(args.query)
    limit = min(args.limit or ctx.row_limit, ctx.row_limit)
    with closing(_connect(ctx)) as conn:
        _guard(conn)
        try:
            rows, more = _fetch(conn.execute(query), limit)
        except sqlite3.Error as exc:
            raise ToolError(_explain_sql_error(exc)) from None
    name = store(ctx, rows, args.as_name, "q")
    note = f" (cut at the {limit}-row limit; aggregate in SQL to see everything)" if more else ""
    return ToolResult(ok=True, content=describe(name, rows, note), dataset=name)


def _connect(ctx: ToolContext) -> sqlite3.Connection:
    path = Path(ctx.db_path)
    if not path.exists():
        raise ToolError(f"the database {path} does not exist; create it with ensure_sales_db().")
    return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)


def _guard(conn: sqlite3.Connection) -> None:
    """Let the statement only read, and stop it after WORK_LIMIT steps."""
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY)
    steps = iter(range(WORK_LIMIT // _STEP))
    conn.set_progress_handler(lambda: next(steps, None) is None, _STEP)


def _single_select(query: str) -> str:
    """The query without trailing `;`, after the friendly checks (the authorizer is the real guard)."""
    body = query.strip()
    for i, char in enumerate(body):
        if char == ";" and sqlite3.complete_statement(body[: i + 1]):
            if body[i + 1:].strip(" \t\r\n;"):
                raise ToolError("send exactly one SQL statement (found more than one ';'-separated statement).")
            body = body[:i]
            break
    word = _FIRST_WORD.match(body).group(1).upper()
    if word not in ("SELECT", "WITH"):
        raise ToolError(f"only SELECT queries are allowed (got {word or 'nothing'}); this database is read-only.")
    return body


def _fetch(cursor: sqlite3.Cursor, limit: int) -> tuple[list[Row], bool]:
    """Up to `limit` rows as dicts (duplicate column names made unique) and whether more rows exist."""
    names: list[str] = []
    for col in (d[0] for d in cursor.description or []):
        name, n = col, 1
        while name in names:
            n += 1
            name = f"{col}_{n}"
        names.append(name)
    raw = cursor.fetchmany(limit + 1)
    rows = [dict(zip(names, map(_plain, values))) for values in raw[:limit]]
    return rows, len(raw) > limit


def _plain(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else value  # keep every row JSON-serialisable


def _tables(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return conn.execute("SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
                        "AND name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute("SELECT * FROM pragma_table_info(?)", (table,))]


def _explain_sql_error(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "not authorized" in text:
        return "the query tries to change or inspect the database, which is not allowed; send one SELECT."
    if text == "interrupted":
        return "the query did too much work and was stopped; add a WHERE, aggregate, or avoid the cross join."
    if "no such table" in text:
        return f"{text}. Call list_tables to see the tables."
    if "no such column" in text:
        return f"{text}. Call describe_table to see the columns."
    return f"SQL error: {text}. Fix the query and try again."
