"""Routes: a name (an agent's, or the `model` a proxy client sends) with a teacher, an optional student, a stage.

Config gives each route's starting values; the live state (stage, student, auto) is kept in the store, so a stage
change made by one process (the CLI, another proxy worker, the gates) is seen by every process. `RouteStates`
re-reads the store when its state version moved, checking at most every `refresh_s` seconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime

from app.bindings import Binding
from app.capture.records import RouteStateRecord, StageChange, utcnow
from app.config import Settings, Stage
from app.errors import UsageError
from app.routing.rollout import STAGES, Gates

REFRESH_S = 0.5  # how stale a serving process's view of the stages may be (the issue asks for under a second)


@dataclass(frozen=True)
class Route:
    name: str
    teacher: Binding
    student: Binding | None = None
    stage: Stage = "teacher"
    auto: bool = True
    min_confidence: float | None = None
    repair: bool = False
    since: datetime | None = None  # when the stored stage began (None: never changed from config)
    version: int = 0


def build_route(settings: Settings, name: str) -> Route:
    """The route named `name` from config alone; unknown names fall back to the default binding."""
    cfg = settings.route(name)
    return Route(
        name=name,
        teacher=settings.binding(cfg.teacher),
        student=settings.binding(cfg.student) if cfg.student else None,
        stage=cfg.stage,
        auto=cfg.auto,
        min_confidence=cfg.min_confidence,
        repair=cfg.repair,
    )


def gates(settings: Settings) -> Gates:
    r = settings.rollout
    return Gates(promote={"shadow": r.shadow_to_canary, "canary": r.canary_to_half, "half": r.half_to_student},
                 min_samples=r.min_samples)


class RouteStates:
    """Each route's live state: config overlaid with what the store holds."""

    def __init__(self, settings: Settings, store=None, refresh_s: float = REFRESH_S):
        self.settings, self.store, self.refresh_s = settings, store, refresh_s
        self._stored: dict[str, RouteStateRecord] = {}
        self._version: int | None = None
        self._checked = float("-inf")
        self._lock = threading.RLock()
        # Routes built for the current view of the store: every call asks, and parsing bindings is not free.
        self._routes: dict[str, Route] = {}

    def get(self, name: str) -> Route:
        with self._lock:  # one view: a route is never cached from a state older than the cache it lands in
            stored = self._current()
            route = self._routes.get(name)
            if route is None:
                route = self._routes[name] = self._build(name, stored.get(name))
            return route

    def _build(self, name: str, stored: RouteStateRecord | None) -> Route:
        base = build_route(self.settings, name)
        if stored is None:
            return base
        student = self.settings.binding(stored.student) if stored.student else base.student
        return replace(base, stage=stored.stage, student=student, auto=stored.auto, since=stored.since,
                       version=stored.version)

    def fresh(self) -> bool:
        """True when `get` will not touch the store (its view is younger than refresh_s, or there is no store)."""
        return self.store is None or time.monotonic() - self._checked < self.refresh_s

    def refresh(self) -> None:
        """Re-read the store now (a test, or a process that just changed a stage itself)."""
        with self._lock:
            self._checked = float("-inf")

    def set_stage(self, name: str, stage: str, reason: str, evidence: dict | None = None,
                  student: str | None = None, auto: bool | None = None) -> Route:
        """Move a route to `stage` (and optionally set its student or auto flag), recording why."""
        if self.store is None:
            raise UsageError("route state lives in the capture store; this process has none")
        if stage not in STAGES:
            raise UsageError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        current = self.get(name)
        if student is not None:
            self.settings.binding(student)  # a bad binding is refused before anything is written
        record = RouteStateRecord(route=name, stage=stage,
                                  student=student or (current.student.canonical() if current.student else None),
                                  auto=current.auto if auto is None else auto,
                                  since=utcnow() if stage != current.stage or current.since is None else current.since)
        change = StageChange(route=name, old_stage=current.stage, new_stage=stage, reason=reason, evidence=evidence)
        self.store.set_route_state(record, change if stage != current.stage else None)
        self.refresh()
        return self.get(name)

    def _current(self) -> dict[str, RouteStateRecord]:
        if self.store is None:
            return self._stored  # always empty: config alone
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.refresh_s:
                return self._stored
            self._checked = now
            version = self.store.route_state_version()
            if version != self._version:
                self._stored, self._version = self.store.route_states(), version
                self._routes = {}
            return self._stored
