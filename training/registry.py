"""The model registry's one action with consequences: promoting a trained model to a route's student.

A promoted model becomes the route's student at stage `shadow` (it answers beside the teacher, never shown to the
client), from where the rollout gates take over. The model the route had promoted before is retired. The route
state and the stage change, with its evidence, are written in one transaction by the store.
"""

from __future__ import annotations

from typing import Any

from app.capture.records import ModelRecord, RouteStateRecord, StageChange, utcnow
from app.config import Settings
from app.errors import UsageError

PROMOTED_STAGE = "shadow"


def check_route(settings: Settings, route: str) -> None:
    """UsageError listing the routes when `route` is not one of them."""
    if route not in settings.route_names():
        raise UsageError(f"no route is named {route!r}; the routes are: {', '.join(settings.route_names())}")


def promote(store: Any, settings: Settings, model: ModelRecord, route: str, reason: str,
            evidence: dict[str, Any] | None = None) -> RouteStateRecord:
    """Make `model` the student of `route` at stage shadow; returns the route's new state.

    Example: promote(store, settings, store.get_model("3f2a"), "retrieval", "promoted by hand")
    """
    check_route(settings, route)
    if model.status == "failed":
        raise UsageError(f"model {model.id} failed its loop run and cannot serve; train another "
                         "(`slmswap loop --once --route ...`)")
    settings.binding(model.binding)  # a binding that cannot be parsed is refused before anything is written
    from app.routing.routes import RouteStates

    current = RouteStates(settings, store).get(route)
    state = RouteStateRecord(route=route, stage=PROMOTED_STAGE, student=model.binding, auto=current.auto,
                             since=utcnow())  # a new student: its gates count from now
    change = StageChange(route=route, old_stage=current.stage, new_stage=PROMOTED_STAGE, reason=reason,
                         evidence={"model_id": model.id, "student": model.binding,
                                   "previous_student": current.student.canonical() if current.student else None,
                                   **(evidence or {})})
    written = store.set_route_state(state, change)
    for old in store.list_models(route=route, status="promoted"):
        if old.id != model.id:
            store.set_model_status(old.id, "retired")
    store.set_model_status(model.id, "promoted")
    return written
