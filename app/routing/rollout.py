"""Staged rollout of a route's student, as pure functions: who answers a call, and when a route changes stage.

    teacher ──► shadow ──► canary (10%) ──► half (50%) ──► student (100%)

`decide` picks the role for one call from the route's state and a sticky key (a hash of the key, so one user stays
on one model for a whole conversation). `judge_stage` looks at the student's judged outcomes in the current stage
and moves the route one step: up when the Wilson lower bound of its success rate reaches the gate out of the stage,
down when it falls under the gate that let it in. Both need `min_samples` judged calls, so a handful of lucky or
unlucky calls moves nothing. The Router does the I/O (the store keeps the state and the outcomes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, get_args

from app.config import Stage
from app.metrics import Rate, exact_match, normalize_value, wilson
from app.validation import Verdict

Role = Literal["teacher", "student"]
STAGES: tuple[Stage, ...] = get_args(Stage)  # in rollout order
STUDENT_SHARE: dict[str, float] = {"teacher": 0.0, "shadow": 0.0, "canary": 0.10, "half": 0.50, "student": 1.0}


@dataclass(frozen=True)
class Gates:
    """The Wilson lower bound a stage's student must reach to move up; `promote[s]` is the gate out of stage s."""

    promote: dict[str, float] = field(default_factory=lambda: {"shadow": 0.90, "canary": 0.90, "half": 0.95})
    min_samples: int = 200
    z: float = 1.96

    def into(self, stage: str) -> float | None:
        """The gate that let a route into `stage` (None for teacher and shadow: only a person moves those)."""
        i = STAGES.index(stage)
        return self.promote.get(STAGES[i - 1]) if i >= 2 else None


@dataclass(frozen=True)
class Decision:
    role: Role  # who answers the client
    shadow: bool = False  # also run the student off the response path and record agreement

    @property
    def student_answers(self) -> bool:
        return self.role == "student"


@dataclass(frozen=True)
class StageChange:
    route: str
    old: Stage
    new: Stage
    reason: str
    rate: Rate


def bucket(route: str, sticky_key: str) -> float:
    """Where a key falls in [0, 1) for this route: stable across processes and restarts.

    >>> bucket("r", "user-1") == bucket("r", "user-1")
    True
    """
    digest = hashlib.sha256(f"{route}\x00{sticky_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def decide(route: str, stage: str, has_student: bool, sticky_key: str) -> Decision:
    """Which role answers this call. Without a student everything stays on the teacher.

    >>> decide("r", "shadow", True, "u").role, decide("r", "shadow", True, "u").shadow
    ('teacher', True)
    """
    if not has_student or stage == "teacher":
        return Decision("teacher")
    if stage == "shadow":
        return Decision("teacher", shadow=True)
    return Decision("student" if bucket(route, sticky_key) < STUDENT_SHARE[stage] else "teacher")


def next_stage(stage: str, step: int) -> Stage:
    """One stage up (step=1) or down (step=-1), clamped to the ends."""
    i = min(max(STAGES.index(stage) + step, 0), len(STAGES) - 1)
    return STAGES[i]


def judge_stage(route: str, stage: str, successes: int, trials: int, gates: Gates) -> StageChange | None:
    """The stage change the student's outcomes in `stage` call for, or None.

    >>> judge_stage("r", "canary", 199, 200, Gates()).new
    'half'
    >>> judge_stage("r", "canary", 150, 200, Gates()).new
    'shadow'
    >>> judge_stage("r", "canary", 150, 199, Gates()) is None   # too few judged calls yet
    True
    """
    if trials < gates.min_samples or stage == "teacher":
        return None
    rate = wilson(successes, trials, gates.z)
    up = gates.promote.get(stage)
    if up is not None and rate.low >= up:
        return StageChange(route, stage, next_stage(stage, 1), f"Wilson lower bound {rate.low:.3f} >= gate {up}", rate)
    down = gates.into(stage)
    if down is not None and rate.low < down:
        return StageChange(route, stage, next_stage(stage, -1),
                           f"Wilson lower bound {rate.low:.3f} < gate {down} of stage {stage}", rate)
    return None


def agreement(teacher: Verdict, student: Verdict, structured: bool) -> bool | None:
    """Whether a shadow student's answer matches the teacher's: tool calls by the exact-match rule, JSON by
    normalised equality; None when there is nothing to compare (the teacher's answer was invalid, or both are
    free text, which only a judge model could compare).

    >>> from app.validation import Verdict, ParsedCall
    >>> agreement(Verdict(True, calls=(ParsedCall("f", {"x": 1}),)), Verdict(True, calls=(ParsedCall("f", {"x": 1.0}),)), True)
    True
    """
    if not teacher.valid:
        return None
    if not student.valid:
        return False
    if teacher.calls or student.calls:
        return exact_match(student.calls, teacher.calls)
    if structured:
        return normalize_value(student.value) == normalize_value(teacher.value)
    return None
