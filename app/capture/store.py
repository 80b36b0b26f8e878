"""The capture store: every model call, run and template, persisted through one object.

    with CaptureStore.open("sqlite:///.slmswap/capture.db") as store:
        store.record(CallRecord(route="retrieval", binding="gguf:smollm2-135m", request=..., response=...))
        store.list_calls(agent="retrieval", limit=5)

Calls go through a group-commit writer (`writer.py`): `record()` returns once the row is committed. Runs and
templates are rare writes and use short transactions of their own. Everything is redacted before it is written.
"""

from __future__ import annotations

import atexit
import os
import socket
import statistics
from collections.abc import Iterable
from dataclasses import fields
from datetime import UTC, datetime
from itertools import groupby
from typing import Any, get_args

from sqlalchemy import Engine, Select, bindparam, case, func, select
from sqlalchemy.exc import SQLAlchemyError

from app.capture.engine import FIX, open_engine, write_transaction
from app.capture.migrations import migrate
from app.capture.records import (AgentStats, CallRecord, LoopRunRecord, ModelRecord, ModelStatus, Outcomes,
                                 RouteStateRecord, RunRecord, RunStatus, Source, StageChange, TemplateRecord,
                                 TemplateStatus, new_id, template_outcome,
                                 utcnow)
from app.capture.redact import redact, redact_text
from app.capture.journal import default_directory
from app.capture.schema import calls, feedback, loop_runs, models, route_state, runs, stage_changes, templates
from app.capture.writer import CompiledInsert, GroupCommitWriter
from app.errors import StoreError, UsageError

_CALL_FIELDS = tuple(f.name for f in fields(CallRecord))
_RUN_FIELDS = tuple(f.name for f in fields(RunRecord))
_TEMPLATE_FIELDS = tuple(f.name for f in fields(TemplateRecord))
_MODEL_FIELDS = tuple(f.name for f in fields(ModelRecord))
_LOOP_FIELDS = tuple(f.name for f in fields(LoopRunRecord))
_MODEL_STATUSES = frozenset(get_args(ModelStatus))
_SOURCES = frozenset(get_args(Source))
_TEMPLATE_STATUSES = frozenset(get_args(TemplateStatus))
_FINAL_STATUSES = frozenset(get_args(RunStatus)) - {"running", "died"}


class CaptureStore:
    """Persists calls, runs and templates; open one with `CaptureStore.open(url)`."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._writer = GroupCommitWriter(CompiledInsert(engine, calls), describe=_describe_failed_call,
                                         then=TemplateTally(engine), journal_dir=default_directory(engine))
        self._closed = False
        self._pid = os.getpid()
        atexit.register(self.close)

    @classmethod
    def open(cls, url: str) -> CaptureStore:
        """Open (creating and migrating as needed) the store at a SQLAlchemy URL."""
        engine = open_engine(url)
        try:
            migrate(engine)
        except SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(f"cannot open the capture store at {_safe_url(engine)}: {exc.__cause__ or exc}; "
                             f"{FIX}") from None
        return cls(engine)

    @property
    def url(self) -> str:
        return _safe_url(self._engine)

    # ---- calls -------------------------------------------------------------------------------------------

    def record(self, call: CallRecord) -> None:
        """Persist one call (redacted); durable when this returns. Concurrent callers share one commit."""
        self._writer.write(_call_row(call))

    def record_soon(self, call: CallRecord) -> None:
        """Queue one call for the next group commit and return at once (never blocks an event loop)."""
        self._writer.submit(_call_row(call))

    async def arecord(self, call: CallRecord) -> None:
        """`record` for async code: awaits the same commit without blocking the event loop.

        A caller cancelled while waiting may still find its call recorded.
        """
        await self._writer.awrite(_call_row(call))

    async def arecord_durable(self, call: CallRecord) -> None:
        """Durable against this process being killed when it returns, without waiting for the commit: one write
        to the local capture journal (`journal.py`), committed by the batched writer soon after; `arecord` where
        the store has no journal (in-memory SQLite). Reads of calls in this process wait for those commits;
        another process sees the call once it is committed (milliseconds later)."""
        if not self._writer.journal(_call_row(call)):
            await self.arecord(call)

    def _settle(self) -> None:
        """Read your own writes: wait until this process's journaled calls are committed."""
        if self._writer.journaled:
            self._writer.write(None)

    def list_calls(self, agent: str | None = None, run_id: str | None = None, limit: int = 50) -> list[CallRecord]:
        """The newest calls first, optionally of one agent or one run."""
        self._settle()
        query = select(calls).order_by(calls.c.created_at.desc(), calls.c.id.desc()).limit(limit)
        if agent is not None:
            query = query.where(calls.c.agent == agent)
        if run_id is not None:
            query = query.where(calls.c.run_id == run_id)
        return [_call(row) for row in self._fetch(query)]

    def get_call(self, id_or_prefix: str) -> CallRecord:
        """The call with this id, or the only one whose id starts with it; UsageError otherwise."""
        self._settle()
        if not id_or_prefix:
            raise UsageError("give a call id or the first characters of one (see `slmswap calls list`)")
        rows = self._fetch(select(calls).where(calls.c.id == id_or_prefix))
        rows = rows or self._fetch(select(calls).where(calls.c.id.startswith(id_or_prefix, autoescape=True))
                                   .order_by(calls.c.id).limit(3))
        if not rows:
            raise UsageError(f"no call has an id starting with {id_or_prefix!r}; "
                             "list recent ones with `slmswap calls list`")
        if len(rows) > 1:
            ids = ", ".join(row["id"] for row in rows[:2])
            raise UsageError(f"{id_or_prefix!r} matches more than one call ({ids}, ...); give more characters")
        return _call(rows[0])

    def calls_for_run(self, run_id: str) -> list[CallRecord]:
        """The calls of one run, in the order they were made."""
        self._settle()
        query = select(calls).where(calls.c.run_id == run_id).order_by(calls.c.created_at, calls.c.id)
        return [_call(row) for row in self._fetch(query)]

    def stats(self) -> list[AgentStats]:
        """Per agent: how many calls, the share that was valid, and the median latency."""
        self._settle()
        query = select(calls.c.agent, calls.c.valid, calls.c.latency_ms).order_by(calls.c.agent)
        return summarize(self._fetch(query))

    def flush(self) -> None:
        """Wait until every call recorded so far (from any thread) is committed."""
        self._writer.write(None)

    # ---- runs --------------------------------------------------------------------------------------------

    def start_run(self, query: str) -> str:
        """Record that a run of the workflow started; returns its id (pass it as the calls' run_id).

        The run keeps this process's pid and host, so that readers can tell a killed run from a live one.
        """
        self._check_open()
        run_id = new_id()
        with self._engine.begin() as conn:
            conn.execute(runs.insert().values(id=run_id, query=redact_text(query), status="running",
                                              started_at=utcnow(), pid=os.getpid(), host=socket.gethostname()))
        return run_id

    def finish_run(self, run_id: str, status: RunStatus, answer: str | None = None,
                   error: str | None = None) -> None:
        """Record how a run ended: status is "ok", "failed" or "interrupted"."""
        self._check_open()
        if status not in _FINAL_STATUSES:
            raise UsageError(f"a run finishes as one of {sorted(_FINAL_STATUSES)}, not {status!r}")
        values = dict(status=status, answer=_redact_opt(answer), error=_redact_opt(error), finished_at=utcnow())
        with self._engine.begin() as conn:
            found = conn.execute(runs.update().where(runs.c.id == run_id).values(**values)).rowcount
        if not found:
            raise UsageError(f"no run has id {run_id!r}; start one with start_run(query)")

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or None. A run stored as "running" whose process on this host is gone reads as "died"."""
        rows = self._fetch(select(runs).where(runs.c.id == run_id))
        return _run(rows[0]) if rows else None

    def list_runs(self, limit: int = 20) -> list[RunRecord]:
        """The newest runs first (with "died" as in `get_run`)."""
        return [_run(row) for row in self._fetch(select(runs).order_by(runs.c.started_at.desc()).limit(limit))]

    # ---- templates ---------------------------------------------------------------------------------------

    def add_template(self, template: TemplateRecord) -> TemplateRecord:
        """Store a template; when the route already holds the same text (same content hash), that row is returned
        and nothing is written. A different text under an id already taken is a UsageError."""
        self._check_open()
        row = {k: getattr(template, k) for k in _TEMPLATE_FIELDS} | {"created_at": _utc(template.created_at)}
        with write_transaction(self._engine) as conn:
            same = conn.execute(select(templates).where(templates.c.route == template.route,
                                                        templates.c.content_hash == template.content_hash))
            if (found := same.mappings().first()) is not None:
                return _template(found)
            if conn.execute(select(templates.c.id).where(templates.c.id == template.id)).first() is not None:
                raise UsageError(f"template id {template.id!r} is taken by another text; templates are never edited "
                                 "in place: add the new text as a new template")
            conn.execute(templates.insert().values(**row))
        return TemplateRecord(**row)

    def get_template(self, template_id: str) -> TemplateRecord | None:
        """One template with its outcome counts, this process's journaled calls counted (read your own writes).
        `list_templates` does not wait for them: selection reads it on the request path."""
        self._settle()
        rows = self._fetch(select(templates).where(templates.c.id == template_id))
        return _template(rows[0]) if rows else None

    def template_by_hash(self, route: str, content_hash: str) -> TemplateRecord | None:
        """The route's template with this content hash (a proxy client's system-prompt fingerprint), if any."""
        rows = self._fetch(select(templates).where(templates.c.route == route,
                                                   templates.c.content_hash == content_hash))
        return _template(rows[0]) if rows else None

    def list_templates(self, route: str | None = None, status: str | None = None) -> list[TemplateRecord]:
        """Templates by route, oldest first; optionally of one route and one status (live, retired)."""
        query = select(templates).order_by(templates.c.route, templates.c.created_at, templates.c.id)
        if route is not None:
            query = query.where(templates.c.route == route)
        if status is not None:
            query = query.where(templates.c.status == status)
        return [_template(row) for row in self._fetch(query)]

    def active_template(self, route: str) -> TemplateRecord | None:
        """The route's newest live template, if any (selection among live ones is prompts/store.py's `sample`)."""
        live = self.list_templates(route, status="live")
        return live[-1] if live else None

    def set_template_status(self, template_id: str, status: str, reason: str | None = None) -> TemplateRecord:
        """Retire a template (or make it live again); UsageError when there is no such template."""
        self._check_open()
        if status not in _TEMPLATE_STATUSES:
            raise UsageError(f"a template's status is one of {sorted(_TEMPLATE_STATUSES)}, not {status!r}")
        with write_transaction(self._engine) as conn:
            update = templates.update().where(templates.c.id == template_id).values(
                status=status, retired_reason=_redact_opt(reason) if status == "retired" else None)
            if not conn.execute(update).rowcount:
                raise UsageError(f"no template has id {template_id!r}; see `slmswap templates list`")
            return _template(conn.execute(select(templates).where(templates.c.id == template_id)).mappings().one())

    def count_template_outcome(self, template_id: str, success: bool) -> None:
        """Add one success or one failure to a template's counts (atomic, safe across processes)."""
        self._check_open()
        column = templates.c.successes if success else templates.c.failures
        with self._engine.begin() as conn:
            update = templates.update().where(templates.c.id == template_id).values({column: column + 1})
            if not conn.execute(update).rowcount:
                raise UsageError(f"no template has id {template_id!r}; see `slmswap templates list`")

    # ---- rollout: route state, stage changes, feedback -------------------------------------------------------

    def route_states(self) -> dict[str, RouteStateRecord]:
        """Every route's stored state (routes never changed from their config have none)."""
        return {row["route"]: _route_state(row) for row in self._fetch(select(route_state))}

    def route_state_version(self) -> int:
        """A number that moves whenever any route's state changes: a cheap poll for serving processes."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(route_state.c.version), 0))).scalar_one())

    def set_route_state(self, state: RouteStateRecord, change: StageChange | None = None) -> RouteStateRecord:
        """Write a route's state (and the stage change that led to it, with its evidence) in one transaction."""
        self._check_open()
        with write_transaction(self._engine) as conn:
            old = conn.execute(select(route_state).where(route_state.c.route == state.route)).mappings().first()
            version = (old["version"] if old else 0) + 1
            row = {"route": state.route, "stage": state.stage, "student": state.student, "auto": state.auto,
                   "since": _utc(state.since), "version": version}
            if old:
                conn.execute(route_state.update().where(route_state.c.route == state.route).values(**row))
            else:
                conn.execute(route_state.insert().values(**row))
            if change is not None:
                conn.execute(stage_changes.insert().values(
                    id=change.id, route=change.route, old_stage=change.old_stage, new_stage=change.new_stage,
                    reason=redact_text(change.reason), evidence=change.evidence, created_at=_utc(change.created_at)))
        return RouteStateRecord(**{**row, "since": _utc(state.since)})

    def stage_changes(self, route: str | None = None, limit: int = 50) -> list[StageChange]:
        query = select(stage_changes).order_by(stage_changes.c.created_at.desc()).limit(limit)
        if route is not None:
            query = query.where(stage_changes.c.route == route)
        return [StageChange(**{**dict(row), "created_at": _utc(row["created_at"])}) for row in self._fetch(query)]

    def add_feedback(self, call_id: str, score: float | None = None, success: bool | None = None,
                     comment: str | None = None) -> str:
        """Store a client's judgement of a call; UsageError when no such call was captured."""
        self._check_open()
        self._settle()
        if score is None and success is None:
            raise UsageError('feedback needs "score" (a number) or "success" (true/false)')
        with write_transaction(self._engine) as conn:
            if conn.execute(select(calls.c.id).where(calls.c.id == call_id)).first() is None:
                raise UsageError(f"no captured call has id {call_id!r}; use the x-slmswap-call-id of a response")
            if _negative(score, success):
                _feedback_fails_template(conn, call_id)
            feedback_id = new_id()
            conn.execute(feedback.insert().values(id=feedback_id, call_id=call_id, score=score, success=success,
                                                  comment=_redact_opt(comment), created_at=utcnow()))
        return feedback_id

    def feedback_rows(self) -> list[tuple[str, float | None, bool | None]]:
        """Every feedback judgement as (call_id, score, success); `training.datasets.feedback_verdicts` reads them."""
        query = select(feedback.c.call_id, feedback.c.score, feedback.c.success)
        with self._engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]

    def student_outcomes(self, route: str, since: datetime) -> Outcomes:
        """The route's judged student calls since `since`: answering ones and shadow ones.

        A call succeeds when its output was valid, it did not disagree with the teacher (where a shadow compared
        them), and no feedback on it was negative (success false or score <= 0). Answering student calls whose
        output failed count as failures too: that is what a fallback is.
        """
        negative = (select(feedback.c.call_id).where((feedback.c.success.is_(False)) | (feedback.c.score <= 0))
                    .scalar_subquery())
        judged = calls.c.role.in_(("student", "shadow")) & (calls.c.route == route) & (calls.c.created_at >= _utc(since))
        # A shadow call whose agreement was not judged (free text without a judge) says nothing either way.
        judged &= ~((calls.c.role == "shadow") & calls.c.agreement.is_(None) & calls.c.valid)
        ok = calls.c.valid & ~calls.c.agreement.is_(False) & ~calls.c.id.in_(negative)
        # No _settle() here: the gates run in worker threads beside the request path and must never wait on a
        # commit (a database held by another writer would pin those threads); calls still in flight count next time.
        query = select(func.count(), func.coalesce(func.sum(case((ok, 1), else_=0)), 0)).where(judged)
        with self._engine.connect() as conn:
            trials, successes = conn.execute(query).one()
        return Outcomes(successes=int(successes), trials=int(trials))

    def usage_summary(self, since: datetime | None = None, route: str | None = None) -> list[dict[str, Any]]:
        """Rows per (route, role, fallback_reason, replaced): calls, spend and what the teacher would have cost.

        `replaced` marks student attempts a teacher fallback replaced. Eval calls are left out. `app.cost.summarize`
        turns the rows into per-route totals.
        """
        self._settle()
        cond = calls.c.source != "eval"
        if since is not None:
            cond &= calls.c.created_at >= _utc(since)
        if route is not None:
            cond &= calls.c.route == route
        replaced = calls.c.id.in_(select(calls.c.parent_id).where(calls.c.fallback_reason.is_not(None))
                                  .scalar_subquery())
        query = (select(calls.c.route, calls.c.role, calls.c.fallback_reason, replaced.label("replaced"),
                        func.count().label("calls"),
                        func.coalesce(func.sum(calls.c.cost_usd), 0.0).label("cost_usd"),
                        func.coalesce(func.sum(calls.c.teacher_cost_usd), 0.0).label("teacher_cost_usd"))
                 .where(cond).group_by(calls.c.route, calls.c.role, calls.c.fallback_reason, replaced)
                 .order_by(calls.c.route, calls.c.role))
        return [dict(row) for row in self._fetch(query)]

    # ---- registry: trained models and the learning loop's runs -------------------------------------------

    def add_model(self, model: ModelRecord) -> ModelRecord:
        """Register a trained model (status candidate unless given)."""
        self._check_open()
        _check_model_status(model.status)
        row = {k: getattr(model, k) for k in _MODEL_FIELDS} | {"created_at": _utc(model.created_at)}
        with write_transaction(self._engine) as conn:
            conn.execute(models.insert().values(**row))
        return model

    def list_models(self, route: str | None = None, status: str | None = None,
                    limit: int = 100) -> list[ModelRecord]:
        """The newest models first, optionally of one route or one status."""
        query = select(models).order_by(models.c.created_at.desc(), models.c.id.desc()).limit(limit)
        if route is not None:
            query = query.where(models.c.route == route)
        if status is not None:
            query = query.where(models.c.status == status)
        return [_model(row) for row in self._fetch(query)]

    def get_model(self, id_or_prefix: str) -> ModelRecord:
        """The model with this id, or the only one whose id starts with it; UsageError otherwise."""
        if not id_or_prefix:
            raise UsageError("give a model id or its first characters (see `slmswap models list`)")
        rows = self._fetch(select(models).where(models.c.id == id_or_prefix))
        rows = rows or self._fetch(select(models).where(models.c.id.startswith(id_or_prefix, autoescape=True))
                                   .order_by(models.c.id).limit(3))
        if not rows:
            raise UsageError(f"no model has an id starting with {id_or_prefix!r}; list them with `slmswap models list`")
        if len(rows) > 1:
            raise UsageError(f"{id_or_prefix!r} matches more than one model ({rows[0]['id']}, {rows[1]['id']}, ...); "
                             "give more characters")
        return _model(rows[0])

    def set_model_status(self, model_id: str, status: str) -> None:
        """Mark a registered model candidate, promoted, retired or failed."""
        self._check_open()
        _check_model_status(status)
        with write_transaction(self._engine) as conn:
            if not conn.execute(models.update().where(models.c.id == model_id).values(status=status)).rowcount:
                raise UsageError(f"no model has id {model_id!r}; list them with `slmswap models list`")

    def update_model_metrics(self, model_id: str, metrics: dict[str, Any]) -> None:
        """Replace a registered model's metrics (the loop adds its evaluation after registering it)."""
        self._check_open()
        with write_transaction(self._engine) as conn:
            if not conn.execute(models.update().where(models.c.id == model_id).values(metrics=metrics)).rowcount:
                raise UsageError(f"no model has id {model_id!r}; list them with `slmswap models list`")

    def add_loop_run(self, run: LoopRunRecord) -> None:
        """Insert a loop run, or replace the one with the same id (a run is written when it starts and ends)."""
        self._check_open()
        row = {k: getattr(run, k) for k in _LOOP_FIELDS}
        row |= {"reason": redact_text(run.reason), "steps": redact(run.steps), "started_at": _utc(run.started_at),
                "finished_at": _utc(run.finished_at)}
        with write_transaction(self._engine) as conn:
            if not conn.execute(loop_runs.update().where(loop_runs.c.id == run.id).values(**row)).rowcount:
                conn.execute(loop_runs.insert().values(**row))

    def list_loop_runs(self, route: str | None = None, limit: int = 50) -> list[LoopRunRecord]:
        """The newest loop runs first, optionally of one route."""
        query = select(loop_runs).order_by(loop_runs.c.started_at.desc(), loop_runs.c.id.desc()).limit(limit)
        if route is not None:
            query = query.where(loop_runs.c.route == route)
        return [LoopRunRecord(**{**dict(row), "started_at": _utc(row["started_at"]),
                                 "finished_at": _utc(row["finished_at"])}) for row in self._fetch(query)]

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is queued and release the database. Idempotent; also runs at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        # In a forked child the pooled connections belong to the parent: drop them without closing them.
        self._engine.dispose(close=os.getpid() == self._pid)
        atexit.unregister(self.close)

    def __enter__(self) -> CaptureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the capture store is closed; open it again with CaptureStore.open(url)")

    def _fetch(self, query: Select) -> list:
        with self._engine.connect() as conn:
            return list(conn.execute(query).mappings())


def _negative(score: float | None, success: bool | None) -> bool:
    """Feedback that judges a call a failure (the rule `student_outcomes` reads too)."""
    return success is False or (score is not None and score <= 0)


def _feedback_fails_template(conn, call_id: str) -> None:
    """The first negative feedback on a call its template counted as a success moves that success to a failure."""
    call = conn.execute(select(calls).where(calls.c.id == call_id)).mappings().one()
    if template_outcome(dict(call)) is not True:
        return  # counted as a failure already, or not counted at all
    earlier = select(feedback.c.id).where(feedback.c.call_id == call_id,
                                          (feedback.c.success.is_(False)) | (feedback.c.score <= 0))
    if conn.execute(earlier.limit(1)).first() is not None:
        return
    conn.execute(templates.update().where(templates.c.id == call["template_id"]).values(
        successes=templates.c.successes - 1, failures=templates.c.failures + 1))


def summarize(rows: Iterable[Any]) -> list[AgentStats]:
    """Per-agent stats from rows with `agent`, `valid` and `latency_ms`, sorted by agent (pure)."""
    out = []
    ordered = sorted(rows, key=lambda r: (r["agent"] is not None, r["agent"] or ""))
    for agent, group in groupby(ordered, key=lambda r: r["agent"]):
        group = list(group)
        valid = sum(1 for r in group if r["valid"])
        median = statistics.median(r["latency_ms"] for r in group)
        out.append(AgentStats(agent=agent, calls=len(group), valid_rate=valid / len(group), p50_latency_ms=median))
    return out


class TemplateTally:
    """The statement a batch of call rows implies: each template's counts move by its calls' outcomes, in the
    transaction that inserts the calls (so a count is never lost nor made twice). Unknown template ids move nothing."""

    def __init__(self, engine: Engine):
        dialect = engine.dialect
        stmt = templates.update().where(templates.c.id == bindparam("tid")).values(
            successes=templates.c.successes + bindparam("ds"), failures=templates.c.failures + bindparam("df"))
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        self._keys = list(compiled.positiontup) if compiled.positional else None

    def __call__(self, rows: list[dict[str, Any]]) -> list[tuple[str, list]]:
        moves: dict[str, list[int]] = {}
        for row in rows:
            outcome = template_outcome(row)
            if outcome is not None:
                moves.setdefault(row["template_id"], [0, 0])[0 if outcome else 1] += 1
        params = [{"tid": tid, "ds": ds, "df": df} for tid, (ds, df) in sorted(moves.items())]
        if self._keys is not None:
            params = [tuple(p[k] for k in self._keys) for p in params]
        return [(self.sql, params)] if params else []


def _call_row(call: CallRecord) -> dict[str, Any]:
    if call.source not in _SOURCES:
        raise UsageError(f"a call's source is one of {sorted(_SOURCES)}, not {call.source!r}")
    row = {k: getattr(call, k) for k in _CALL_FIELDS}
    row["request"] = redact(call.request)
    row["response"] = redact(call.response)
    row["error_detail"] = _redact_opt(call.error_detail)
    row["created_at"] = _utc(call.created_at)
    return row


def _call(row) -> CallRecord:
    return CallRecord(**{k: row[k] for k in _CALL_FIELDS if k != "created_at"}, created_at=_utc(row["created_at"]))


def _run(row) -> RunRecord:
    values = {k: row[k] for k in _RUN_FIELDS}
    if values["status"] == "running" and _died(values["pid"], values["host"]):
        # Reported, not written: the row keeps what its process last said, and nothing races a live writer.
        values["status"] = "died"
    return RunRecord(**values | {"started_at": _utc(row["started_at"]), "finished_at": _utc(row["finished_at"])})


def _died(pid: int | None, host: str | None) -> bool:
    """True when the process `pid` on this host no longer exists; unknown (another host, no pid) is False."""
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def _route_state(row) -> RouteStateRecord:
    return RouteStateRecord(**{**dict(row), "since": _utc(row["since"])})


def _model(row) -> ModelRecord:
    return ModelRecord(**{k: row[k] for k in _MODEL_FIELDS} | {"created_at": _utc(row["created_at"])})


def _check_model_status(status: str) -> None:
    if status not in _MODEL_STATUSES:
        raise UsageError(f"a model's status is one of {', '.join(sorted(_MODEL_STATUSES))}, not {status!r}")


def _template(row) -> TemplateRecord:
    return TemplateRecord(**{k: row[k] for k in _TEMPLATE_FIELDS} | {"created_at": _utc(row["created_at"])})


def _utc(value: datetime | None) -> datetime | None:
    # SQLite keeps no time zone, so every datetime is stored in UTC and read back as UTC.
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _redact_opt(text: str | None) -> str | None:
    return None if text is None else redact_text(text)


def _describe_failed_call(row: dict[str, Any], exc: BaseException) -> str:
    if isinstance(exc, (TypeError, ValueError)):
        return (f"call {row['id']} holds data that is not JSON ({exc}); build request and response with "
                "records.request_payload() and records.response_payload()")
    if "UNIQUE" in str(exc).upper() or "DUPLICATE" in str(exc).upper():
        return f"call {row['id']} is already recorded; give each call a fresh id (records.new_id())"
    return (f"could not record call {row['id']}: {exc}; check that the database's disk (or its server) is "
            f"available and {FIX}")


def _safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
