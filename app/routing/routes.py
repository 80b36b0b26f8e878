"""Routes: a name (an agent's, or the `model` a proxy client sends) bound to a teacher, an optional student, a stage.

Only the teacher answers until the proxy issue adds rollout; the stage and student are carried so that the rollout
machinery slots in without rework (`pick_binding` is the seam).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.bindings import Binding
from app.config import Settings, Stage


@dataclass(frozen=True)
class Route:
    name: str
    teacher: Binding
    student: Binding | None = None
    stage: Stage = "teacher"


def build_route(settings: Settings, name: str) -> Route:
    """The route named `name` from config; unknown names fall back to the default binding."""
    cfg = settings.route(name)
    return Route(
        name=name,
        teacher=settings.binding(cfg.teacher),
        student=settings.binding(cfg.student) if cfg.student else None,
        stage=cfg.stage,
    )


def pick_binding(route: Route) -> Binding:
    """Which binding answers this call. Rollout (shadow, canary, half, student) comes with the proxy issue."""
    if route.stage == "student" and route.student is not None:
        return route.student
    return route.teacher
