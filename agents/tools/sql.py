"""Retrieval tools: read-only SQL over the run's SQLite database.

Read-only is enforced twice, neither by pattern matching alone: the file is opened with `mode=ro`, and an
authorizer lets the statement only read tables and call functions. A query is cut off after a fixed amount
of work, so a runaway join or recursive CTE cannot stall the run; SQLite itself refuses any value over
VALUE_BYTES, so `randomblob(999999999)` fails before it allocates; and rows are fetched one at a time, each
cell cut to CELL_CHARS, until the row limit or RESULT_BYTES, so one result stays small in memory.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from agents.bounds import CELL_CHARS, RESULT_BYTES, cut_note
from agents.tools.base import Args, Row, ToolContext, ToolResult, tool
from agents.tools.tables import describe, preview, store
from app.errors import ToolError

WORK_LIMIT = 50_000_000  # SQLite VM steps; a full scan of the sample sales view takes under 1M
VALUE_BYTES = 1_000_000  # the largest string or blob SQLite may build or read for a query
_STEP = 10_000
MAX_COLUMNS = 100  # with VALUE_BYTES, bounds one row; not SQLITE_LIMIT_COLUMN, which breaks wider tables' schema
# SQLite's own limits, set on every connection: the size of a value (or stored row), the statement's text.
_LIMITS = {sqlite3.SQLITE_LIMIT_LENGTH: VALUE_BYTES, sqlite3.SQLITE_LIMIT_SQL_LENGTH: 100_000}
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
        sample = _fetch(conn.execute(f"SELECT * FROM {quoted} LIMIT 3"), 3).rows
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
            _check_width(conn, query)
            fetched = _fetch(conn.execute(query), limit)
        except sqlite3.Error as exc:
            raise ToolError(_explain_sql_error(exc)) from None
    name = store(ctx, fetched.rows, args.as_name, "q")
    return ToolResult(ok=True, content=describe(name, fetched.rows, fetched.note(limit)), dataset=name)


def _connect(ctx: ToolContext) -> sqlite3.Connection:
    path = Path(ctx.db_path)
    if not path.exists():
        raise ToolError(f"the database {path} does not exist; create it with ensure_sales_db().")
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    for category, value in _LIMITS.items():
        conn.setlimit(category, value)
    return conn


def _guard(conn: sqlite3.Connection) -> None:
    """Let the statement only read, and stop it after WORK_LIMIT steps."""
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY)
    steps = iter(range(WORK_LIMIT // _STEP))
    conn.set_progress_handler(lambda: next(steps, None) is None, _STEP)


def _check_width(conn: sqlite3.Connection, query: str) -> None:
    """Refuse a result wider than MAX_COLUMNS before SQLite builds its first row (`execute` runs one step, and
    `SELECT v, v, v, ...` over one 1 MB value would hold a megabyte per column)."""
    # LIMIT 0: SQLite prepares the statement and stops before computing any value. The newlines keep a
    # trailing `--` comment from swallowing the closing parenthesis.
    try:
        width = len(conn.execute(f"SELECT * FROM (\n{query}\n) LIMIT 0").description or [])
    except sqlite3.Error:
        return  # not a plain SELECT (e.g. WITH ... DELETE): running it gives the error that explains why
    if width > MAX_COLUMNS:
        raise ToolError(f"the query returns {width} columns; select at most {MAX_COLUMNS}.")


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


@dataclass
class Fetched:
    rows: list[Row]
    more: bool = False  # rows were left unread
    by_size: bool = False  # ... because the kept cells passed RESULT_BYTES, not the row limit
    cells_cut: int = 0

    def note(self, limit: int) -> str:
        """What the model must know about what it did not get, e.g. ` (cut at the 50-row limit; ...)`."""
        parts = []
        if self.more and self.by_size:
            parts.append(f"cut after {len(self.rows)} rows, at the {RESULT_BYTES:,}-byte result limit; "
                         "select fewer or shorter columns, or aggregate in SQL")
        elif self.more:
            parts.append(f"cut at the {limit}-row limit; aggregate in SQL to see everything")
        if self.cells_cut:
            parts.append(f"{self.cells_cut} cell(s) over {CELL_CHARS:,} characters cut, each marked [cut: ...]")
        return f" ({'; '.join(parts)})" if parts else ""


def _fetch(cursor: sqlite3.Cursor, limit: int) -> Fetched:
    """Up to `limit` rows as dicts (duplicate column names made unique), read one at a time so that the
    result byte limit stops the query early instead of after SQLite has produced everything."""
    names = _unique_names([d[0] for d in cursor.description or []])
    out, size = Fetched([]), 0
    for values in cursor:
        if len(out.rows) == limit or size > RESULT_BYTES:
            out.more, out.by_size = True, len(out.rows) < limit
            break
        cells = [_cell(v) for v in values]
        out.cells_cut += sum(cut for _, cut in cells)
        size += sum(len(str(v)) for v, _ in cells)
        out.rows.append(dict(zip(names, (v for v, _ in cells))))
    return out


def _unique_names(columns: list[str]) -> list[str]:
    names: list[str] = []
    for col in columns:
        name, n = col, 1
        while name in names:
            n += 1
            name = f"{col}_{n}"
        names.append(name)
    return names


def _cell(value: Any) -> tuple[Any, bool]:
    """The value as it is saved (blobs as hex, to keep every row JSON-serialisable), and whether it was cut."""
    if isinstance(value, bytes):
        shown = CELL_CHARS // 2  # two hex digits a byte
        if len(value) <= shown:
            return value.hex(), False
        return f"{value[:shown].hex()} {cut_note('cell', len(value), shown, 'bytes')}", True
    if isinstance(value, str) and len(value) > CELL_CHARS:
        return f"{value[:CELL_CHARS]} {cut_note('cell', len(value), CELL_CHARS)}", True
    return value, False


def _tables(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return conn.execute("SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
                        "AND name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute("SELECT * FROM pragma_table_info(?)", (table,))]


def _explain_sql_error(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "not authorized" in text:
        return "the query tries to change or inspect the database, which is not allowed; send one SELECT."
    if "too big" in text:  # SQLITE_TOOBIG: a value over SQLITE_LIMIT_LENGTH
        return (f"a value in the query is larger than {VALUE_BYTES:,} bytes, the most one value may hold; "
                "leave that column out, or build smaller values.")
    if text == "interrupted":
        return "the query did too much work and was stopped; add a WHERE, aggregate, or avoid the cross join."
    if "no such table" in text:
        return f"{text}. Call list_tables to see the tables."
    if "no such column" in text:
        return f"{text}. Call describe_table to see the columns."
    return f"SQL error: {text}. Fix the query and try again."
