"""Route state, stage changes, feedback and the student outcomes the gates read, on a real store: SQLite and
PostgreSQL, where several proxy processes share one route state."""

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from app.capture.engine import write_transaction
from app.capture.records import CallRecord, RouteStateRecord, StageChange
from app.capture.schema import route_state
from app.capture.store import CaptureStore
from app.errors import UsageError

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(store_url):  # store_url (tests/conftest.py): SQLite and PostgreSQL
    with CaptureStore.open(store_url) as s:
        yield s


def call(role="student", valid=True, agreement=None, at=T0 + timedelta(minutes=1), route="r", **kw) -> CallRecord:
    return CallRecord(route=route, binding="gguf:x", request={"messages": []}, response=None, valid=valid, role=role,
                      agreement=agreement, created_at=at, **kw)


def test_route_state_round_trips_and_its_version_moves(store):
    assert store.route_states() == {} and store.route_state_version() == 0
    state = store.set_route_state(RouteStateRecord("r", "shadow", "gguf:s", True, T0),
                                  StageChange("r", "teacher", "shadow", "set by hand", {"by": "cli"}))
    assert store.route_states()["r"] == state and state.version == 1
    before = store.route_state_version()
    store.set_route_state(RouteStateRecord("r", "canary", "gguf:s", True, T0))
    assert store.route_state_version() > before
    [change] = store.stage_changes("r")
    assert (change.old_stage, change.new_stage, change.evidence) == ("teacher", "shadow", {"by": "cli"})


def test_outcomes_count_judged_student_calls_of_the_current_stage_only(store):
    for c in [call(), call(valid=False), call(role="shadow", agreement=True), call(role="shadow", agreement=False),
              call(role="shadow", agreement=None),  # free text, not judged: does not count
              call(role="shadow", valid=False),  # invalid counts as a failure even unjudged
              call(role="teacher"),  # the teacher is not being judged
              call(at=T0 - timedelta(minutes=1)),  # before the stage began
              call(route="other")]:
        store.record(c)
    assert store.student_outcomes("r", T0) == type(store.student_outcomes("r", T0))(successes=2, trials=5)


def test_negative_feedback_turns_a_success_into_a_failure(store):
    good = call()
    store.record(good)
    assert store.student_outcomes("r", T0).successes == 1
    store.add_feedback(good.id, success=False, comment="wrong region")
    assert store.student_outcomes("r", T0).successes == 0
    other = call()
    store.record(other)
    store.add_feedback(other.id, score=0.8)
    assert store.student_outcomes("r", T0).successes == 1


def test_feedback_on_an_unknown_call_or_without_a_judgement_is_a_usage_error(store):
    with pytest.raises(UsageError, match="no captured call has id 'nope'"):
        store.add_feedback("nope", success=True)
    store.record(c := call())
    with pytest.raises(UsageError, match='needs "score"'):
        store.add_feedback(c.id)


def waiting_for_locks(postgres, url: str, n: int) -> None:
    """Block until `n` sessions of this database wait on a lock (bounded: only a broken lock takes this long)."""
    deadline = time.monotonic() + 30
    with postgres.connect(url) as conn:
        while conn.execute("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                           "WHERE NOT l.granted AND d.datname = current_database()").fetchone()[0] < n:
            assert time.monotonic() < deadline, f"fewer than {n} sessions waited on a lock"
            time.sleep(0.01)


def test_two_processes_changing_one_new_route_both_count(postgres, postgres_url):
    # Process A (an engine of its own) is between reading a route's state and writing it; B's change must wait
    # for A's commit and build on it, not read the same "no state yet" and collide on the insert.
    with CaptureStore.open(postgres_url) as a, CaptureStore.open(postgres_url) as b:
        results, errors = [], []

        def change_in_b():
            try:
                results.append(b.set_route_state(RouteStateRecord("r", "canary", "gguf:s", True, T0)))
            except Exception as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        with write_transaction(a._engine) as conn:
            assert conn.execute(select(route_state).where(route_state.c.route == "r")).first() is None
            thread = threading.Thread(target=change_in_b)
            thread.start()
            waiting_for_locks(postgres, postgres_url, 1)
            conn.execute(route_state.insert().values(route="r", stage="shadow", student="gguf:s", auto=True,
                                                     since=T0, version=1))
        thread.join()
        assert errors == [] and results[0].version == 2
        assert a.route_states()["r"].stage == "canary" and a.route_state_version() == 2
