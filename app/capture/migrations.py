"""Append-only schema migrations for the capture store, applied by `migrate(engine)` on every open.

Each step is `mNNN_name(conn)`, runs in its own transaction and is recorded by name in `_migrations`. Steps
are frozen history: they never import `schema.py` (which describes the present), they are never edited once
released, and a retired step stays in the list as a no-op so that numbers never shift. Only portable DDL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import (JSON, Boolean, Column, Connection, DateTime, Engine, Float, Index, Integer, MetaData,
                        String, Table, inspect, select, text)

from app.capture.engine import MIGRATE_LOCK_KEY, write_transaction

Migration = Callable[[Connection], None]
MIGRATIONS: list[Migration] = []
migration = MIGRATIONS.append

_ledger = Table(
    "_migrations",
    MetaData(),
    Column("name", String, primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)


def migrate(engine: Engine, stop_before: str | None = None) -> list[str]:
    """Apply the steps this database lacks, in order; returns their names (empty when up to date).

    `stop_before` names a step not to apply, nor any after it (tests use it to build an old schema).
    """
    if not pending(engine):
        return []
    with _migration_lock(engine):
        return _apply(engine, stop_before)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, hold a session advisory lock for the whole run, so that N proxy processes starting at once
    on a new database migrate one after another: the first applies every step, the others find nothing to do.
    SQLite needs none: each step's BEGIN IMMEDIATE already serialises them."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
        conn.commit()  # the lock belongs to the session, not to this transaction; end it so it holds no snapshot
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATE_LOCK_KEY})
            conn.commit()


def _apply(engine: Engine, stop_before: str | None) -> list[str]:
    applied = []
    for step in MIGRATIONS:
        if step.__name__ == stop_before:
            break
        # One transaction per step, holding the write lock, so two processes opening at once cannot both apply it.
        with write_transaction(engine) as conn:
            _ledger.create(conn, checkfirst=True)
            if conn.scalar(select(_ledger.c.name).where(_ledger.c.name == step.__name__)) is None:
                step(conn)
                conn.execute(_ledger.insert().values(name=step.__name__, applied_at=datetime.now(UTC)))
                applied.append(step.__name__)
    return applied


def pending(engine: Engine) -> list[str]:
    """Names of the steps not yet applied to this database."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(_ledger.name):
            return [step.__name__ for step in MIGRATIONS]
        done = set(conn.scalars(select(_ledger.c.name)))
    return [step.__name__ for step in MIGRATIONS if step.__name__ not in done]


def _create_table(conn: Connection, name: str, *items) -> None:
    Table(name, MetaData(), *items).create(conn)


def _add_column(conn: Connection, table: str, column: Column) -> None:
    Table(table, MetaData(), column)  # the DDL compiler needs the column to belong to a table
    spec = conn.dialect.ddl_compiler(conn.dialect, None).get_column_specification(column)
    conn.exec_driver_sql(f"ALTER TABLE {conn.dialect.identifier_preparer.quote(table)} ADD COLUMN {spec}")


@migration
def m001_initial(conn: Connection) -> None:
    _create_table(
        conn, "calls",
        Column("id", String, primary_key=True),
        Column("run_id", String),
        Column("route", String, nullable=False),
        Column("agent", String),
        Column("binding", String, nullable=False),
        Column("template_id", String),
        Column("request", JSON, nullable=False),
        Column("response", JSON),
        Column("valid", Boolean, nullable=False),
        Column("error_type", String),
        Column("error_detail", String),
        Column("latency_ms", Float, nullable=False),
        Column("prompt_tokens", Integer, nullable=False),
        Column("completion_tokens", Integer, nullable=False),
        Column("cost_usd", Float, nullable=False),
        Column("teacher_cost_usd", Float),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Index("ix_calls_agent_created_at", "agent", "created_at"),
        Index("ix_calls_run_id", "run_id"),
    )
    _create_table(
        conn, "templates",
        Column("id", String, primary_key=True),
        Column("agent", String, nullable=False),
        Column("version", Integer, nullable=False),
        Column("parent_id", String),
        Column("origin", String, nullable=False),
        Column("text", String, nullable=False),
        Column("successes", Integer, nullable=False, server_default="0"),
        Column("failures", Integer, nullable=False, server_default="0"),
        Column("active", Boolean, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Index("ix_templates_agent", "agent"),
    )


@migration
def m002_calls_source(conn: Connection) -> None:
    # Calls recorded before the proxy existed all came from the graph.
    _add_column(conn, "calls", Column("source", String, nullable=False, server_default="graph"))


@migration
def m003_runs(conn: Connection) -> None:
    _create_table(
        conn, "runs",
        Column("id", String, primary_key=True),
        Column("query", String, nullable=False),
        Column("status", String, nullable=False),
        Column("answer", String),
        Column("error", String),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True)),
    )


@migration
def m004_runs_pid_host(conn: Connection) -> None:
    # Runs recorded before this step have no pid: the store cannot tell whether they died, so they read as stored.
    _add_column(conn, "runs", Column("pid", Integer))
    _add_column(conn, "runs", Column("host", String))


@migration
def m005_rollout(conn: Connection) -> None:
    # Calls recorded before rollout were all answered by the route's teacher.
    _add_column(conn, "calls", Column("role", String, nullable=False, server_default="teacher"))
    for name, kind in (("parent_id", String), ("fallback_reason", String), ("agreement", Boolean), ("caller", String)):
        _add_column(conn, "calls", Column(name, kind))
    Index("ix_calls_route_created_at", Table("calls", MetaData(), Column("route", String),
                                             Column("created_at", DateTime(timezone=True))).c.route,
          "created_at").create(conn)
    _create_table(
        conn, "route_state",
        Column("route", String, primary_key=True),
        Column("stage", String, nullable=False),
        Column("student", String),
        Column("auto", Boolean, nullable=False),
        Column("since", DateTime(timezone=True), nullable=False),
        Column("version", Integer, nullable=False),
    )
    _create_table(
        conn, "stage_changes",
        Column("id", String, primary_key=True),
        Column("route", String, nullable=False),
        Column("old_stage", String),
        Column("new_stage", String, nullable=False),
        Column("reason", String, nullable=False),
        Column("evidence", JSON),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Index("ix_stage_changes_route", "route", "created_at"),
    )
    _create_table(
        conn, "feedback",
        Column("id", String, primary_key=True),
        Column("call_id", String, nullable=False),
        Column("score", Float),
        Column("success", Boolean),
        Column("comment", String),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Index("ix_feedback_call_id", "call_id"),
    )


@migration
def m006_templates(conn: Connection) -> None:
    # Templates become per route with a content hash and a live/retired status, so a table rebuild: `agent` is the
    # route, `active` the status; `version` goes (the id names the version). Every row and its counts are kept. An
    # old duplicate text of a route keeps its row, its hash suffixed with its id so the unique index holds.
    import hashlib
    import re

    old = Table("templates", MetaData(), Column("id", String), Column("agent", String), Column("parent_id", String),
                Column("origin", String), Column("text", String), Column("successes", Integer),
                Column("failures", Integer), Column("active", Boolean), Column("created_at", DateTime(timezone=True)))
    rows = [dict(row) for row in conn.execute(select(old).order_by(old.c.created_at, old.c.id)).mappings()]
    _create_table(
        conn, "templates_m006",
        Column("id", String, primary_key=True),
        Column("route", String, nullable=False),
        Column("text", String, nullable=False),
        Column("parent_id", String),
        Column("origin", String, nullable=False),
        Column("content_hash", String, nullable=False),
        Column("status", String, nullable=False),
        Column("retired_reason", String),
        Column("successes", Integer, nullable=False, server_default="0"),
        Column("failures", Integer, nullable=False, server_default="0"),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    new = Table("templates_m006", MetaData(), *(Column(name, kind) for name, kind in (
        ("id", String), ("route", String), ("text", String), ("parent_id", String), ("origin", String),
        ("content_hash", String), ("status", String), ("retired_reason", String), ("successes", Integer),
        ("failures", Integer), ("created_at", DateTime(timezone=True)))))
    seen = set()
    for row in rows:
        digest = hashlib.sha256(re.sub(r"\s+", " ", row["text"]).strip().encode("utf-8")).hexdigest()
        if (row["agent"], digest) in seen:
            digest = f"{digest}:{row['id']}"
        seen.add((row["agent"], digest))
        conn.execute(new.insert().values(
            id=row["id"], route=row["agent"], text=row["text"], parent_id=row["parent_id"], origin=row["origin"],
            content_hash=digest, status="live" if row["active"] else "retired",
            retired_reason=None if row["active"] else "inactive before m006", successes=row["successes"],
            failures=row["failures"], created_at=row["created_at"]))
    old.drop(conn)
    quote = conn.dialect.identifier_preparer.quote
    conn.exec_driver_sql(f"ALTER TABLE {quote('templates_m006')} RENAME TO {quote('templates')}")
    table = Table("templates", MetaData(), Column("route", String), Column("status", String),
                  Column("content_hash", String))
    Index("ix_templates_route_status", table.c.route, table.c.status).create(conn)
    Index("ux_templates_route_hash", table.c.route, table.c.content_hash, unique=True).create(conn)
