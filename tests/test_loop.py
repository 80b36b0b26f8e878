"""The learning loop: its two decisions as pure functions, each ending of a run with injected steps (what it stores
and why, and that a failure leaves the serving student alone), and `slmswap loop --once` end to end with the real
steps on a store the Router filled from a scripted teacher."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest

from app.capture.store import CaptureStore
from app.config import load_settings
from app.routing.context import CallContext
from app.routing import router as router_module
from app.routing.router import Router
from app.wire import ChatRequest
from tests.support.requires import require
from tests.support.scripted import tool
from tests.test_cli import slmswap
from training import loop
from training.loop import Exported, Schedule, Trained, enough_new_calls, new_qualifying, should_promote

# BFCL-like: one function, its arguments in the question. The enum leaves a grammar one answer, so any model
# decoding under it is exact, and which way the promotion goes is set by the test's config, not by luck.
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]},
                                                    "unit": {"type": "string", "enum": ["celsius"]}},
                   "required": ["city", "unit"]}}}]
TOML = """[routes.support]
teacher = "scripted:t"
{student}
[loop]
min_new_calls = {min_new}
min_examples = 5
share_of_teacher = {share}
max_steps = 2
max_tokens = 48
routes = ["support"]
"""


def configure(min_new: int = 5, share: float = 0.9, student: str | None = None) -> None:
    Path("slmswap.toml").write_text(TOML.format(min_new=min_new, share=share,
                                                student=f'student = "{student}"' if student else ""))


def capture(scripted, n: int, start: int = 0) -> list[str]:
    """`n` calls to route support through the real Router, answered by the scripted teacher and captured; returns
    their ids. The ids are fixed (the held-out split is a hash of the id), so every run splits the same way."""
    scripted("t").default = tool("get_weather", city="Paris", unit="celsius")
    settings = load_settings()
    ids = iter(uuid.UUID(int=i + 1).hex for i in range(start, start + n))
    with CaptureStore.open(settings.store.url) as store, mock.patch.object(router_module, "new_id", lambda: next(ids)):
        router = Router(settings, store)

        async def go():
            for i in range(start, start + n):
                req = ChatRequest(model="support", tools=WEATHER, tool_choice="required", parallel_tool_calls=False,
                                  messages=[{"role": "user", "content": f"Weather in Paris, in celsius? (#{i})"}])
                await router.complete(req, CallContext(route="support", source="proxy", sticky_key=f"user{i}"))
            await router.drain()

        asyncio.run(go())
    return [uuid.UUID(int=i + 1).hex for i in range(start, start + n)]


# ---- decisions -------------------------------------------------------------------------------------------

def test_enough_new_calls_is_a_threshold_with_its_reason():
    assert enough_new_calls(99, 100) == loop.Decision(False, "99 new qualifying calls since the last run; 100 needed",
                                                      {"new_calls": 99, "min_new_calls": 100})
    assert enough_new_calls(100, 100).ok and enough_new_calls(500, 100).ok


@pytest.mark.parametrize("candidate, teacher, student, share, ok, why", [
    (0.9, 1.0, None, 0.9, True, "reaches 90% of the teacher's 100.0%"),
    (0.89, 1.0, None, 0.9, False, "is under 90% of the teacher's 100.0% (needs 90.0%)"),
    (0.5, 0.5, None, 1.0, True, "reaches 100%"),
    (0.95, 1.0, 0.95, 0.9, False, "does not beat the current student (95.0%)"),
    (0.96, 1.0, 0.95, 0.9, True, "beats the current student's 95.0%"),
    (0.0, 0.0, None, 0.9, False, "the teacher scored 0% exact"),
])
def test_should_promote_needs_the_share_of_the_teacher_and_to_beat_the_student(candidate, teacher, student, share,
                                                                              ok, why):
    decision = should_promote(candidate, teacher, student, share)
    assert decision.ok is ok and why in decision.reason
    assert decision.evidence["candidate_exact"] == candidate and decision.evidence["share"] == share


def test_new_qualifying_counts_only_calls_after_the_last_run():
    created = {"a": 1, "b": 2, "c": 3}
    assert new_qualifying(["a", "b", "c"], created, None) == 3
    assert new_qualifying(["a", "b", "c"], created, 2) == 1


# ---- runs with injected steps ----------------------------------------------------------------------------

def fake_steps(exact: dict[str, float] | None = None, fail_at: str | None = None) -> loop.Steps:
    """The real build step; train, export and evaluate scripted (evaluate answers `exact` per binding)."""
    def train(ctx, built):
        if fail_at == "train":
            raise RuntimeError("out of memory")
        return Trained(ctx.folder / "run", ctx.folder / "run" / "adapter", {"loss_last": 0.5}, "hash1")

    def export(ctx, trained):
        return Exported(ctx.folder / "adapter.gguf", "scripted:candidate")

    def evaluate(ctx, bindings):
        if fail_at == "evaluate":
            raise RuntimeError("eval died")
        return {b: (exact or {}).get(b, 1.0) for b in bindings}

    return replace(loop.REAL_STEPS, train=train, export=export, evaluate=evaluate)


def run_once(steps: loop.Steps):
    settings = load_settings()
    with CaptureStore.open(settings.store.url) as store:
        [result] = loop.run_loop(settings, store, steps=steps)
        return result, store.list_models(), store.route_states(), store.list_loop_runs()


def test_too_few_new_calls_skips_and_says_so(scripted):
    configure(min_new=1000)
    capture(scripted, 8)
    result, models, states, runs = run_once(fake_steps())
    assert result.status == "skipped" and "new qualifying calls since the last run; 1000 needed" in result.reason
    assert models == [] and states == {} and runs == [result]
    assert result.steps[0]["step"] == "build" and result.steps[0]["new_calls"] >= 1


def test_a_candidate_short_of_the_teacher_is_registered_but_not_promoted_with_its_reason(scripted):
    configure(share=0.9)
    capture(scripted, 12)
    result, [model], states, _ = run_once(fake_steps({"scripted:t": 1.0, "scripted:candidate": 0.5}))
    assert result.status == "not_promoted" and result.model_id == model.id
    assert "candidate exact 50.0% is under 90% of the teacher's 100.0%" in result.reason
    assert model.status == "candidate" and model.metrics["decision"] == result.reason
    assert model.metrics["eval"]["exact"] == {"scripted:t": 1.0, "scripted:candidate": 0.5}
    assert states == {}  # the route still serves what it served
    assert [s["step"] for s in result.steps] == ["build", "train", "export", "evaluate", "decide"]


def test_a_failing_step_records_why_marks_the_model_failed_and_leaves_the_student_serving(scripted):
    configure(student="scripted:old")
    capture(scripted, 12)
    result, [], states, _ = run_once(fake_steps(fail_at="train"))
    assert result.status == "failed" and result.reason == "train failed: RuntimeError: out of memory"
    assert states == {}
    configure(min_new=1, student="scripted:old")
    capture(scripted, 3, start=100)
    result, [model], states, _ = run_once(fake_steps(fail_at="evaluate"))
    assert result.status == "failed" and "evaluate failed" in result.reason and model.status == "failed"
    assert states == {}


def test_slmswap_loop_once_exits_1_when_a_run_failed(capsys, scripted, monkeypatch):
    configure()
    capture(scripted, 12)
    monkeypatch.setattr(loop, "REAL_STEPS", fake_steps(fail_at="train"))
    code, out, _ = slmswap(capsys, "loop", "--once")
    assert code == 1 and "failed" in out and "out of memory" in out


def test_a_candidate_that_earns_it_becomes_the_student_at_shadow_and_later_runs_count_new_calls_only(scripted):
    configure(student="scripted:old")
    capture(scripted, 12)
    result, [model], states, _ = run_once(fake_steps({"scripted:t": 1.0, "scripted:candidate": 0.95,
                                                      "scripted:old": 0.6}))
    assert result.status == "promoted" and "beats the current student's 60.0%" in result.reason
    assert model.status == "promoted" and (states["support"].stage, states["support"].student) == (
        "shadow", "scripted:candidate")
    with CaptureStore.open(load_settings().store.url) as store:
        [change] = store.stage_changes(route="support")
    assert change.evidence["loop_run"] == result.id and change.evidence["model_id"] == model.id
    again, *_ = run_once(fake_steps())
    assert again.status == "skipped" and again.steps[0]["new_calls"] == 0


def test_the_schedule_skips_its_turn_while_another_process_holds_the_lock(scripted):
    import fcntl

    from app.server import scheduled_jobs

    configure(min_new=1000)
    settings = load_settings()
    with CaptureStore.open(settings.store.url) as store:
        schedule = Schedule(settings, store, fake_steps())
        assert [r.status for r in schedule.tick()] == ["skipped"]
        Path(settings.loop.dir, "loop.lock").touch()
        with open(Path(settings.loop.dir, "loop.lock")) as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            assert schedule.tick() == []
        assert scheduled_jobs(settings, store) == ()  # no every_s: nothing runs inside serve
        settings.loop.every_s = 60
        (job,) = scheduled_jobs(settings, store)
        assert job.name == "learning loop" and job.seconds == 60


def test_loop_refuses_a_route_that_does_not_exist(capsys, scripted):
    configure()
    code, _, err = slmswap(capsys, "loop", "--once", "--route", "nope")
    assert code == 2 and "no route is named 'nope'; the routes are:" in err
    code, _, err = slmswap(capsys, "loop")
    assert code == 2 and "--once" in err


# ---- end to end: the real steps --------------------------------------------------------------------------

def test_slmswap_loop_once_trains_exports_evaluates_registers_and_puts_the_student_at_shadow(capsys, scripted):
    require("transformers")
    require("llama_cpp")
    require("training.export")  # H3's export (branch s13-export): present once that branch is merged
    configure(share=0.5, student="scripted:old")
    capture(scripted, 12)
    scripted("old").default = tool("get_weather", city="Paris", unit="celsius")  # exact: the candidate cannot beat it
    code, out, err = slmswap(capsys, "loop", "--once")
    assert code == 0, out + err
    with CaptureStore.open(load_settings().store.url) as store:
        [first] = store.list_loop_runs()
        [candidate] = store.list_models()
    assert first.status == "not_promoted" and "does not beat the current student (100.0%)" in first.reason
    exact = candidate.metrics["eval"]["exact"]
    assert exact["scripted:t"] == 1.0 and exact[candidate.binding] == 1.0  # the grammar leaves one answer
    assert candidate.binding.startswith("gguf:") and Path(candidate.gguf).is_file()
    assert candidate.metrics["train"]["steps"] == 2 and candidate.dataset_hash

    configure(min_new=1, share=0.5)  # no student now: reaching half the teacher's exact rate is enough
    capture(scripted, 3, start=100)
    code, out, err = slmswap(capsys, "loop", "--once")
    assert code == 0 and "promoted" in out, out + err
    with CaptureStore.open(load_settings().store.url) as store:
        latest, _ = store.list_loop_runs()
        model = store.get_model(latest.model_id)
        state = store.route_states()["support"]
    assert latest.status == "promoted" and model.status == "promoted"
    assert (state.stage, state.student) == ("shadow", model.binding)
    assert [s["step"] for s in latest.steps] == ["build", "train", "export", "evaluate", "decide", "promote"]


def test_serve_runs_the_loop_on_its_schedule_only_when_configured(scripted):
    import time

    from app.server import scheduled_jobs
    from app.server.routes import create_app
    from app.services import Services
    from tests.support.http import serve

    configure(min_new=1000)
    Path("slmswap.toml").write_text(Path("slmswap.toml").read_text() + "every_s = 0.05\n")
    services = Services.from_settings(load_settings())
    with serve(create_app(services.settings, services, periodic=scheduled_jobs(services.settings, services.store))):
        deadline = time.monotonic() + 60  # a bound for a busy machine, not a timing assumption
        while not any(r.finished_at for r in services.store.list_loop_runs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        runs = [r for r in services.store.list_loop_runs() if r.finished_at]
    assert runs and {r.status for r in runs} == {"skipped"} and {r.route for r in runs} == {"support"}
