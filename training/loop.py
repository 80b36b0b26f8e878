"""The learning loop: per route, when enough new qualifying calls were captured, build a dataset, train a LoRA,
export it to GGUF, evaluate it against the teacher on the route's held-out calls, register it, and promote it to
`shadow` when it earns it.

The two decisions are pure functions (`enough_new_calls`, `should_promote`), and the five steps with side
effects are fields of `Steps`, so tests can swap any of them. Every run is a `loop_runs` row written when it
starts and when it ends: its status (skipped | promoted | not_promoted | failed), the reason in words, and what
each step decided with its evidence. A step that raises ends the run as failed, marks its model failed, and
leaves the route state (the serving student) untouched.

    from training.loop import run_loop
    results = run_loop(settings, store, routes=["retrieval"])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.capture.records import LoopRunRecord, ModelRecord, utcnow
from app.config import Settings
from app.errors import SlmSwapError, UsageError

log = logging.getLogger("slmswap.loop")


# ---- decisions (pure) ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def enough_new_calls(new_calls: int, min_new_calls: int) -> Decision:
    """Train only once `min_new_calls` qualifying calls arrived since the route's last loop run.

    >>> enough_new_calls(3, 100).ok, enough_new_calls(100, 100).ok
    (False, True)
    """
    evidence = {"new_calls": new_calls, "min_new_calls": min_new_calls}
    if new_calls < min_new_calls:
        return Decision(False, f"{new_calls} new qualifying calls since the last run; {min_new_calls} needed", evidence)
    return Decision(True, f"{new_calls} new qualifying calls since the last run (>= {min_new_calls})", evidence)


def should_promote(candidate: float, teacher: float, student: float | None, share: float) -> Decision:
    """Promote when the candidate's exact-match rate reaches `share` of the teacher's and beats the current
    student's (None: the route has no student).

    >>> should_promote(0.9, 1.0, None, 0.9).ok, should_promote(0.8, 1.0, None, 0.9).ok
    (True, False)
    >>> should_promote(0.95, 1.0, 0.95, 0.9).reason
    'candidate exact 95.0% does not beat the current student (95.0%)'
    """
    evidence = {"candidate_exact": candidate, "teacher_exact": teacher, "student_exact": student, "share": share}
    if teacher <= 0:
        return Decision(False, "the teacher scored 0% exact on its own held-out answers: nothing to measure "
                               "against", evidence)
    needed = share * teacher
    if candidate < needed:
        return Decision(False, f"candidate exact {candidate:.1%} is under {share:.0%} of the teacher's "
                               f"{teacher:.1%} (needs {needed:.1%})", evidence)
    if student is not None and candidate <= student:
        return Decision(False, f"candidate exact {candidate:.1%} does not beat the current student "
                               f"({student:.1%})", evidence)
    return Decision(True, f"candidate exact {candidate:.1%} reaches {share:.0%} of the teacher's {teacher:.1%}"
                          + (f" and beats the current student's {student:.1%}" if student is not None else ""),
                    evidence)


def new_qualifying(kept_ids: Iterable[str], created: dict[str, Any], since: Any) -> int:
    """How many kept examples come from calls created after `since` (None: all of them)."""
    ids = list(kept_ids)
    return len(ids) if since is None else sum(1 for i in ids if created[i] > since)


# ---- steps (side effects, injectable) --------------------------------------------------------------------

@dataclass(frozen=True)
class Built:
    folder: Path
    examples: int
    new_calls: int


@dataclass(frozen=True)
class Trained:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    dataset_hash: str | None = None


@dataclass(frozen=True)
class Exported:
    gguf: Path
    binding: str


@dataclass(frozen=True)
class LoopContext:
    settings: Settings
    store: Any
    route: str
    folder: Path  # this run's folder: dataset/, run/, eval/
    since: Any  # when the route's last loop run started (None: never)


@dataclass(frozen=True)
class Steps:
    """What the loop does at each step; replace any field to test without models."""

    build: Callable[[LoopContext], Built]
    train: Callable[[LoopContext, Built], Trained]
    export: Callable[[LoopContext, Trained], Exported]
    # bindings (teacher first) -> exact-match rate per binding, on the route's held-out captured calls
    evaluate: Callable[[LoopContext, tuple[str, ...]], dict[str, float]]


def build_step(ctx: LoopContext) -> Built:
    """The route's training set as `slmswap dataset build` writes it (hermes rows), counting the new calls."""
    from training import datasets as ds

    cfg = ctx.settings.loop
    calls = ctx.store.list_calls(limit=2**62)
    sel = ds.select(calls, ds.feedback_verdicts(ctx.store.feedback_rows()), routes=[ctx.route])
    created = {c.id: c.created_at for c in calls}
    new = new_qualifying((ex.id for ex in sel.kept), created, ctx.since)
    folder = ctx.folder / "dataset"
    if new >= cfg.min_new_calls and len(sel.kept) >= cfg.min_examples:
        splits = ds.split(sel.kept)
        rows = {name: [ds.to_hermes(ex) for ex in exs] for name, exs in splits.items()}
        ds.write_dataset(folder, rows, "hermes", {"source": "store", "routes": [ctx.route], "by": "loop",
                                                  "val_percent": ds.VAL_PERCENT, "dropped": dict(sel.dropped)})
    return Built(folder, len(sel.kept), new)


def train_step(ctx: LoopContext, built: Built) -> Trained:
    from training.train import TrainOptions, dataset_hash, train

    cfg = ctx.settings.loop
    options = TrainOptions(dataset=built.folder, base=cfg.base, preset=cfg.preset(ctx.route), out=ctx.folder / "run",
                           max_steps=cfg.max_steps, epochs=cfg.epochs)
    result = train(options)
    return Trained(result.run_dir, result.adapter_dir, dict(result.metrics), dataset_hash(built.folder))


def export_step(ctx: LoopContext, trained: Trained) -> Exported:
    from training.export import export_adapter, serving_binding

    return Exported(export_adapter(trained.run_dir), serving_binding(trained.run_dir))


def evaluate_step(ctx: LoopContext, bindings: tuple[str, ...]) -> dict[str, float]:
    from training.evaluate import EvalOptions, run_eval

    cfg = ctx.settings.loop
    summary = run_eval(EvalOptions(suite=f"captured:{ctx.route}", models=bindings, limit=cfg.eval_limit,
                                   out=ctx.folder / "eval", config=ctx.settings.source, max_tokens=cfg.max_tokens))
    # The summary is keyed by each binding as shown (redacted), in the order given: read it by position.
    return {b: m["exact_rate"] for b, m in zip(bindings, summary["models"].values(), strict=True)}


REAL_STEPS = Steps(build=build_step, train=train_step, export=export_step, evaluate=evaluate_step)


# ---- the run ---------------------------------------------------------------------------------------------

class _Run:
    """One route's loop run: each step appends what it decided, and the row is rewritten as it goes."""

    def __init__(self, store: Any, route: str):
        self.store = store
        self.record = LoopRunRecord(route=route, status="running", reason="started")
        self.store.add_loop_run(self.record)

    def note(self, step: str, decision: str, **evidence: Any) -> None:
        log.info("loop %s: %s: %s", self.record.route, step, decision)
        self.record = replace(self.record, steps=[*self.record.steps, {"step": step, "decision": decision,
                                                                       **evidence}])

    def end(self, status: str, reason: str, model_id: str | None = None) -> LoopRunRecord:
        log.info("loop %s: %s (%s)", self.record.route, status, reason)
        self.record = replace(self.record, status=status, reason=reason, finished_at=utcnow(),
                              model_id=model_id or self.record.model_id)
        self.store.add_loop_run(self.record)
        return self.record


def last_run_start(store: Any, route: str) -> Any:
    """When the route's last loop run that got past the new-calls check started (None: never)."""
    for run in store.list_loop_runs(route=route, limit=1000):
        if run.status != "skipped":
            return run.started_at
    return None


def run_route(settings: Settings, store: Any, route: str, steps: Steps | None = None) -> LoopRunRecord:
    """One loop run on one route; never raises for a failing step (the run records it as failed)."""
    steps = steps or REAL_STEPS
    from app.routing.routes import RouteStates
    from training.registry import promote

    cfg = settings.loop
    since = last_run_start(store, route)
    run = _Run(store, route)
    ctx = LoopContext(settings, store, route, Path(cfg.dir) / f"{route}-{run.record.id[:12]}", since)
    model: ModelRecord | None = None
    step = "build"
    try:
        built = steps.build(ctx)
        enough = enough_new_calls(built.new_calls, cfg.min_new_calls)
        if enough.ok and built.examples < cfg.min_examples:
            enough = Decision(False, f"{built.examples} training examples for the route; min_examples is "
                                     f"{cfg.min_examples}", {**enough.evidence, "examples": built.examples})
        run.note("build", enough.reason, examples=built.examples, **enough.evidence)
        if not enough.ok:
            return run.end("skipped", enough.reason)
        step = "train"
        trained = steps.train(ctx, built)
        run.note("train", "trained", run_dir=str(trained.run_dir), metrics=trained.metrics)
        step = "export"
        exported = steps.export(ctx, trained)
        run.note("export", "exported", gguf=str(exported.gguf), binding=exported.binding)
        model = store.add_model(ModelRecord(route=route, base=cfg.base, binding=exported.binding,
                                            adapter=str(trained.adapter_dir), gguf=str(exported.gguf),
                                            dataset_hash=trained.dataset_hash, metrics={"train": trained.metrics}))
        run.record = replace(run.record, model_id=model.id)
        step = "evaluate"
        route_now = RouteStates(settings, store).get(route)
        teacher = route_now.teacher.canonical()
        student = route_now.student.canonical() if route_now.student else None
        bindings = tuple(dict.fromkeys(b for b in (teacher, exported.binding, student) if b))
        exact = steps.evaluate(ctx, bindings)
        run.note("evaluate", "evaluated on the held-out captured calls", exact=exact)
        verdict = should_promote(exact[exported.binding], exact[teacher],
                                 exact.get(student) if student and student != exported.binding else None,
                                 cfg.share_of_teacher)
        _merge_metrics(store, model, {"eval": {"exact": exact}, "decision": verdict.reason})
        run.note("decide", verdict.reason, **verdict.evidence)
        if not verdict.ok:
            return run.end("not_promoted", verdict.reason, model.id)
        step = "promote"
        promote(store, settings, store.get_model(model.id), route, f"loop run {run.record.id}: {verdict.reason}",
                {"loop_run": run.record.id, **verdict.evidence})
        run.note("promote", f"student {exported.binding} at shadow")
        return run.end("promoted", verdict.reason, model.id)
    except (Exception, KeyboardInterrupt) as exc:
        reason = f"{step} failed: {exc}" if isinstance(exc, SlmSwapError) else f"{step} failed: {type(exc).__name__}: {exc}"
        log.warning("loop %s: %s", route, reason, exc_info=not isinstance(exc, SlmSwapError))
        if model is not None:
            store.set_model_status(model.id, "failed")
        run.note(step, "failed", error=reason)
        run.end("failed", reason)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return run.record


def _merge_metrics(store: Any, model: ModelRecord, extra: dict[str, Any]) -> None:
    """Keep the evaluation with the model: the registry row is re-written with its metrics extended."""
    store.update_model_metrics(model.id, {**(model.metrics or {}), **extra})


def loop_routes(settings: Settings, routes: Iterable[str] | None = None) -> list[str]:
    """The routes a loop run looks at: those given, else `[loop] routes`, else every route; UsageError for one
    that does not exist."""
    from training.registry import check_route

    chosen = list(routes or []) or list(settings.loop.routes) or settings.route_names()
    for route in chosen:
        check_route(settings, route)
    return chosen


def run_loop(settings: Settings, store: Any, routes: Iterable[str] | None = None,
             steps: Steps | None = None) -> list[LoopRunRecord]:
    """One loop run on each route, one after another."""
    return [run_route(settings, store, route, steps) for route in loop_routes(settings, routes)]


# ---- the schedule inside `slmswap serve` -----------------------------------------------------------------

class Schedule:
    """One round of the loop for `serve`'s schedule (`[loop] every_s`; app/server runs `tick` in a worker thread on
    that period). Among several serving processes on one machine only one runs it at a time (an exclusive lock on
    `<loop dir>/loop.lock`); the others skip their turn."""

    def __init__(self, settings: Settings, store: Any, steps: Steps | None = None):
        self.settings, self.store, self.steps = settings, store, steps

    def tick(self) -> list[LoopRunRecord]:
        """One round if no other process holds the lock (empty when one does)."""
        import fcntl

        folder = Path(self.settings.loop.dir)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "loop.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []
            try:
                return run_loop(self.settings, self.store, steps=self.steps)
            except UsageError as exc:  # a route in [loop] routes that does not exist: say so, keep serving
                log.warning("loop: %s", exc)
                return []


__all__ = ["Built", "Decision", "Exported", "LoopContext", "REAL_STEPS", "Schedule", "Steps", "Trained",
           "enough_new_calls", "loop_routes", "run_loop", "run_route", "should_promote"]
