"""The capture store's tables as they are now, declared once with SQLAlchemy Core.

Only portable types (String without a length is VARCHAR on PostgreSQL, TEXT on SQLite). `migrations.py` brings
an existing database to this shape; `tests/test_migrate.py` checks that every path arrives at exactly it.
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, DateTime, Float, Index, Integer, MetaData, String, Table

metadata = MetaData()

calls = Table(
    "calls",
    metadata,
    Column("id", String, primary_key=True),
    Column("run_id", String),
    Column("route", String, nullable=False),
    Column("agent", String),
    Column("binding", String, nullable=False),
    Column("template_id", String),
    Column("request", JSON, nullable=False),  # messages, tools, tool_choice, response_format, params
    Column("response", JSON),  # content, tool_calls, finish_reason
    Column("valid", Boolean, nullable=False),
    Column("error_type", String),
    Column("error_detail", String),
    Column("latency_ms", Float, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost_usd", Float, nullable=False),
    Column("teacher_cost_usd", Float),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("source", String, nullable=False, server_default="graph"),  # graph | proxy | eval; added by m002
    # Added by m004: who answered (teacher | student | shadow), the first attempt a fallback replaced, why, whether a
    # shadow student agreed with the teacher, and the hash of the proxy key that made the call.
    Column("role", String, nullable=False, server_default="teacher"),
    Column("parent_id", String),
    Column("fallback_reason", String),
    Column("agreement", Boolean),
    Column("caller", String),
    Index("ix_calls_agent_created_at", "agent", "created_at"),
    Index("ix_calls_run_id", "run_id"),
    Index("ix_calls_route_created_at", "route", "created_at"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String, primary_key=True),
    Column("query", String, nullable=False),
    Column("status", String, nullable=False),  # running | ok | failed | interrupted
    Column("answer", String),
    Column("error", String),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("pid", Integer),  # the process running it and its host, to tell a live run from a killed one; m004
    Column("host", String),
)

templates = Table(
    "templates",
    metadata,
    Column("id", String, primary_key=True),  # stable, e.g. retrieval/base@1
    Column("route", String, nullable=False),
    Column("text", String, nullable=False),
    Column("parent_id", String),
    Column("origin", String, nullable=False),  # base | evolved | manual | langfuse
    Column("content_hash", String, nullable=False),  # records.template_hash(text): one row per text per route
    Column("status", String, nullable=False),  # live | retired
    Column("retired_reason", String),
    Column("successes", Integer, nullable=False, server_default="0"),
    Column("failures", Integer, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_templates_route_status", "route", "status"),
    Index("ux_templates_route_hash", "route", "content_hash", unique=True),
)

route_state = Table(
    "route_state",
    metadata,
    Column("route", String, primary_key=True),
    Column("stage", String, nullable=False),
    Column("student", String),
    Column("auto", Boolean, nullable=False),
    Column("since", DateTime(timezone=True), nullable=False),  # when the current stage began
    Column("version", Integer, nullable=False),  # +1 on every change: serving processes re-read when it moves
)

stage_changes = Table(
    "stage_changes",
    metadata,
    Column("id", String, primary_key=True),
    Column("route", String, nullable=False),
    Column("old_stage", String),
    Column("new_stage", String, nullable=False),
    Column("reason", String, nullable=False),
    Column("evidence", JSON),  # successes, trials, rate, low, high, gate
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_stage_changes_route", "route", "created_at"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", String, primary_key=True),
    Column("call_id", String, nullable=False),
    Column("score", Float),
    Column("success", Boolean),
    Column("comment", String),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_feedback_call_id", "call_id"),
)
