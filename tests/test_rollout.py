"""Rollout decisions and gates as pure functions, on synthetic keys and outcome streams (no models)."""

import random

import pytest

from app.routing.rollout import STAGES, Gates, bucket, decide, judge_stage, next_stage

KEYS = [f"user-{i}" for i in range(20_000)]


def student_share(stage: str) -> float:
    return sum(decide("route", stage, True, k).role == "student" for k in KEYS) / len(KEYS)


@pytest.mark.parametrize("stage, share", [("teacher", 0.0), ("shadow", 0.0), ("canary", 0.10), ("half", 0.50),
                                          ("student", 1.0)])
def test_each_stage_sends_its_share_to_the_student(stage, share):
    assert student_share(stage) == pytest.approx(share, abs=0.01)


def test_shadow_keeps_the_teacher_answering_and_runs_the_student_beside_it():
    d = decide("route", "shadow", True, "u")
    assert (d.role, d.shadow) == ("teacher", True)
    assert not decide("route", "canary", True, "u").shadow


def test_without_a_student_the_teacher_answers_at_every_stage():
    assert {decide("route", s, False, k).role for s in STAGES for k in KEYS[:200]} == {"teacher"}


def test_assignment_is_sticky_and_nested_across_stages():
    """A key keeps its model within a stage, and a key on the student at 10% stays on it at 50% and 100%."""
    for k in KEYS[:2000]:
        roles = [decide("route", s, True, k).role for s in ("canary", "half", "student")]
        assert roles == [decide("route", s, True, k).role for s in ("canary", "half", "student")]
        if roles[0] == "student":
            assert roles[1:] == ["student", "student"]
    assert bucket("a", "u") != bucket("b", "u")  # routes are assigned independently


def outcomes(rate: float, n: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    return sum(rng.random() < rate for _ in range(n))


@pytest.mark.parametrize("stage, true_rate, expected", [
    ("shadow", 0.99, "canary"), ("canary", 0.99, "half"), ("half", 0.995, "student"),
    ("canary", 0.80, "shadow"), ("half", 0.85, "canary"), ("student", 0.90, "half"),
    ("shadow", 0.50, None),  # shadow is entered by a person: a weak student just stays there
    ("student", 0.995, None),  # nothing above student
    ("half", 0.93, None),  # between its gates (in at 0.90, out at 0.95): stay
])
def test_gates_promote_and_demote_on_synthetic_streams(stage, true_rate, expected):
    n = 2000
    change = judge_stage("route", stage, outcomes(true_rate, n), n, Gates())
    assert (change.new if change else None) == expected
    if change:
        assert change.old == stage and change.rate.n == n and "Wilson lower bound" in change.reason


def test_nothing_moves_before_min_samples():
    gates = Gates(min_samples=200)
    assert judge_stage("route", "canary", 199, 199, gates) is None
    assert judge_stage("route", "canary", 0, 199, gates) is None
    assert judge_stage("route", "canary", 200, 200, gates).new == "half"


def test_gates_and_min_samples_are_configurable():
    strict = Gates(promote={"shadow": 0.99, "canary": 0.99, "half": 0.99}, min_samples=10)
    assert judge_stage("route", "shadow", 95, 100, strict) is None
    assert judge_stage("route", "shadow", 100, 100, Gates(min_samples=10)).new == "canary"


def test_next_stage_is_one_step_clamped():
    assert [next_stage(s, 1) for s in STAGES] == ["shadow", "canary", "half", "student", "student"]
    assert [next_stage(s, -1) for s in STAGES] == ["teacher", "teacher", "shadow", "canary", "half"]
