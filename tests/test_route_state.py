"""Route state, stage changes, feedback and the student outcomes the gates read, on a real store."""

from datetime import UTC, datetime, timedelta

import pytest

from app.capture.records import CallRecord, RouteStateRecord, StageChange
from app.capture.store import CaptureStore
from app.errors import UsageError

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(tmp_path):
    with CaptureStore.open(f"sqlite:///{tmp_path}/c.db") as s:
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
