"""The Router's rollout on a real store with scripted teacher and student: who answers, fallback, shadow, gates."""

import asyncio
import json
from pathlib import Path

import pytest

from app.capture.store import CaptureStore
from app.config import load_settings
from app.errors import BackendError, UpstreamTimeout
from app.routing.context import CallContext
from app.routing.router import Router
from app.wire import AssistantMessage, ChatRequest, ChatResponse, Choice, Usage
from tests.support.scripted import tool

TOOLS = [{"type": "function", "function": {"name": "run_sql", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"], "additionalProperties": False}}}]
GOOD, OTHER, BAD = tool("run_sql", query="SELECT 1"), tool("run_sql", query="SELECT 2"), tool("run_sql", sql="x")


def config(stage="teacher", auto=True, min_samples=200, judge_every=10, shadow=4, min_confidence=None):
    extra = f"\nmin_confidence = {min_confidence}" if min_confidence is not None else ""
    Path("slmswap.toml").write_text(f'''
[routes.r]
teacher = "scripted:t"
student = "scripted:s"
stage = "{stage}"
auto = {str(auto).lower()}{extra}

[rollout]
min_samples = {min_samples}
judge_every = {judge_every}
shadow_concurrency = {shadow}
''')


@pytest.fixture
def make(tmp_path):
    opened = []

    def make() -> Router:
        store = CaptureStore.open(f"sqlite:///{tmp_path}/calls.db")
        opened.append(store)
        router = Router(load_settings(), store)
        router.states.refresh_s = 0  # tests read the store on every call instead of waiting out the poll
        return router

    yield make
    for s in opened:
        s.close()


def ask(user="u1", tools=True) -> tuple[ChatRequest, CallContext]:
    req = ChatRequest(model="r", messages=[{"role": "user", "content": "q"}], **({"tools": TOOLS} if tools else {}))
    # A graph call is committed before complete() returns, so each gate check sees every call before it; a proxy
    # call is durable at its journal write and reaches the gates once committed (tests/test_journal.py).
    return req, CallContext(route="r", sticky_key=user, source="graph")


def complete(router, user="u1", tools=True):
    return asyncio.run(router.complete(*ask(user, tools)))


def rows(router):
    return sorted(router.store.list_calls(limit=500), key=lambda c: c.created_at)


def test_teacher_stage_uses_the_teacher_only(make, scripted):
    config("teacher")
    scripted("t").default = GOOD
    resp = complete(make())
    assert (resp.slmswap.role, resp.slmswap.binding) == ("teacher", "scripted:t")
    assert scripted("s").requests == []


def test_student_stage_answers_with_the_student(make, scripted):
    config("student")
    scripted("s").default = GOOD
    router = make()
    resp = complete(router)
    assert (resp.slmswap.role, resp.slmswap.binding) == ("student", "scripted:s") and resp.slmswap.valid
    [row] = rows(router)
    assert (row.role, row.parent_id) == ("student", None)


@pytest.mark.parametrize("failure, reason", [
    (BAD, "invalid"),
    (BackendError("scripted:s failed (HTTP 500): down"), "error"),
    (UpstreamTimeout("scripted:s timed out after 5 s"), "timeout"),
])
def test_a_failing_student_is_replaced_by_the_teacher_and_both_are_captured(make, scripted, failure, reason):
    config("student")
    scripted("s").enqueue(failure)
    scripted("t").default = GOOD
    router = make()
    resp = complete(router)
    assert (resp.slmswap.role, resp.slmswap.valid) == ("teacher", True)
    student, teacher = rows(router)
    assert (student.role, student.valid) == ("student", False)
    assert (teacher.role, teacher.parent_id, teacher.fallback_reason) == ("teacher", student.id, reason)
    assert router.counts["fallback", "r", reason] == 1
    assert student.request == teacher.request  # the same request went to both


def test_low_confidence_falls_back(make, scripted):
    config("student", min_confidence=-0.5)
    unsure = ChatResponse(choices=[Choice(message=AssistantMessage(tool_calls=[GOOD]), finish_reason="tool_calls",
                                          confidence=-1.2)], usage=Usage(prompt_tokens=3, completion_tokens=3))
    scripted("s").enqueue(unsure)
    scripted("t").default = GOOD
    router = make()
    assert complete(router).slmswap.role == "teacher"
    student, teacher = rows(router)
    assert student.error_type == "low_confidence" and teacher.fallback_reason == "confidence"


def test_canary_and_half_assign_users_stickily(make, scripted):
    config("canary")
    scripted("t").default = scripted("s").default = GOOD
    router = make()
    first = [complete(router, f"user-{i}").slmswap.role for i in range(60)]
    again = [complete(router, f"user-{i}").slmswap.role for i in range(60)]
    assert first == again and 0 < first.count("student") < 20


def test_shadow_answers_with_the_teacher_and_records_the_students_agreement(make, scripted):
    config("shadow")
    scripted("t").default = GOOD
    scripted("s").enqueue(GOOD, OTHER, BAD)
    router = make()

    async def three():
        roles = [(await router.complete(*ask(f"u{i}"))).slmswap.role for i in range(3)]
        await router.drain()
        return roles

    assert asyncio.run(three()) == ["teacher"] * 3
    shadows = [r for r in rows(router) if r.role == "shadow"]
    teachers = {r.id for r in rows(router) if r.role == "teacher"}
    assert sorted((s.valid, s.agreement) for s in shadows) == [(False, False), (True, False), (True, True)]
    assert all(s.parent_id in teachers for s in shadows)


def test_shadow_is_shed_when_its_slots_are_full(make, scripted):
    config("shadow", shadow=0)
    scripted("t").default = GOOD
    router = make()
    complete(router)
    assert router.counts["shadow_shed", "r", ""] == 1 and scripted("s").requests == []


def run_many(router, n, tools=True):
    async def go():
        for i in range(n):
            await router.complete(*ask(f"user-{i}", tools))
        await router.drain()
    asyncio.run(go())


def test_the_gates_promote_a_shadow_student_that_agrees(make, scripted):
    config("shadow", min_samples=20, judge_every=1)
    scripted("t").default = scripted("s").default = GOOD
    router = make()
    router.states.set_stage("r", "shadow", "started by the test")
    run_many(router, 34)  # 34 agreeing of 34: Wilson lower bound 0.898, under the 0.90 gate
    assert router.route("r").stage == "shadow"
    run_many(router, 1)  # 35 of 35: 0.901
    assert router.route("r").stage == "canary"
    change = router.store.stage_changes("r")[0]
    assert (change.old_stage, change.new_stage) == ("shadow", "canary")
    assert change.evidence["trials"] >= 20 and change.evidence["low"] >= 0.9 and "Wilson" in change.reason


def test_the_gates_demote_a_failing_student_one_stage(make, scripted):
    config("half", min_samples=10, judge_every=1)
    scripted("t").default = GOOD
    scripted("s").default = BAD
    router = make()
    router.states.set_stage("r", "half", "started by the test")

    async def until_it_moves():
        for i in range(200):
            await router.complete(*ask(f"user-{i}"))
            await router.drain()  # the gate check runs in a worker thread; let it finish before the next call
            if router.route("r").stage != "half":
                return

    asyncio.run(until_it_moves())
    assert router.route("r").stage == "canary"  # one step down; the counts start again for canary
    change = router.store.stage_changes("r")[0]
    assert (change.old_stage, change.new_stage, change.evidence["trials"], change.evidence["successes"]) == (
        "half", "canary", 10, 0)


def test_auto_false_freezes_the_stage(make, scripted):
    config("shadow", auto=False, min_samples=5, judge_every=1)
    scripted("t").default = scripted("s").default = GOOD
    router = make()
    router.states.set_stage("r", "shadow", "started by the test")
    run_many(router, 10)
    assert router.route("r").stage == "shadow"


def test_a_stage_set_by_one_process_is_obeyed_by_another(make, scripted):
    config("teacher")
    scripted("t").default = scripted("s").default = GOOD
    serving, cli = make(), make()
    assert complete(serving).slmswap.role == "teacher"
    cli.states.set_stage("r", "student", "set by hand")
    assert complete(serving).slmswap.role == "student"


def test_a_held_student_stream_that_fails_validation_is_replaced_by_the_teachers(make, scripted):
    config("student")
    scripted("s").enqueue(BAD)
    scripted("t").default = GOOD

    async def collect(router):
        return [c async for c in router.stream(*ask())]

    router = make()
    chunks = asyncio.run(collect(router))
    assert chunks[0].slmswap.role == "teacher"  # nothing of the student's reached the client
    calls = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or []]
    assert calls[0]["function"]["arguments"] == '{"query": "SELECT 1"}'
    assert chunks[-1].choices == [] and chunks[-1].slmswap.valid and chunks[-1].usage.completion_tokens > 0
    student, teacher = rows(router)
    assert teacher.parent_id == student.id and teacher.fallback_reason == "invalid"


def test_plain_text_from_the_student_streams_at_once(make, scripted):
    config("student")
    scripted("s").default = "hello from the student"
    router = make()

    async def collect():
        return [c async for c in router.stream(*ask(tools=False))]

    chunks = asyncio.run(collect())
    assert chunks[0].slmswap.role == "student"
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices).strip() == "hello from the student"


def test_a_failing_student_binding_is_skipped_then_probed_after_the_cool_down(make, scripted):
    from app.routing.breaker import Breakers

    config("student")
    now = [0.0]
    router = make()
    router.breakers = Breakers(threshold=2, cooldown_s=30, clock=lambda: now[0])
    scripted("s").default = BackendError("scripted:s failed (HTTP 500): down")
    scripted("t").default = GOOD
    for _ in range(4):
        assert complete(router).slmswap.role == "teacher"
    assert len(scripted("s").requests) == 2  # opened after two failures: the next two calls skip the student
    skipped = [r for r in rows(router) if r.role == "student"][2:]
    assert [r.error_type for r in skipped] == ["backend_error", "backend_error"]
    assert all("is skipped: it failed 2 times in a row" in r.error_detail for r in skipped)
    now[0] = 31.0  # the cool-down is over: one probe goes through, and it succeeds
    scripted("s").default = GOOD
    assert complete(router).slmswap.role == "student"
    assert not router.breakers.is_open("scripted:s")


def test_free_text_shadows_are_judged_by_the_judge_binding_when_one_is_set(make, scripted):
    config("shadow")
    with open("slmswap.toml", "a") as f:
        f.write('judge = "scripted:judge"\n')
    scripted("t").default = "Paris is the capital."
    scripted("s").enqueue("The capital is Paris.", "It is Lyon.")
    scripted("judge").default = lambda req: json.dumps({"agree": "B:\nThe capital is Paris" in req.messages[1].content})
    router = make()

    async def two():
        for i in range(2):
            await router.complete(*ask(f"u{i}", tools=False))
        await router.drain()

    asyncio.run(two())
    shadows = sorted((r.response["content"], r.agreement) for r in rows(router) if r.role == "shadow")
    assert shadows == [("It is Lyon.", False), ("The capital is Paris.", True)]
    judged = [r.messages[1].content for r in scripted("judge").requests]
    assert len(judged) == 2 and all("Answer A:\nParis is the capital." in j for j in judged)


def test_free_text_shadows_without_a_judge_are_not_judged(make, scripted):
    config("shadow")
    scripted("t").default = scripted("s").default = "same words"
    router = make()

    async def one():
        await router.complete(*ask("u", tools=False))
        await router.drain()

    asyncio.run(one())
    [shadow] = [r for r in rows(router) if r.role == "shadow"]
    assert shadow.agreement is None
