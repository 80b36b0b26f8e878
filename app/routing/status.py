"""What `slmswap rollout status` and `slmswap cost` show: each route's stage, split, judged success and saving."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from app.config import Settings
from app.cost import RouteCost, summarize
from app.metrics import Rate, wilson
from app.routing.rollout import STUDENT_SHARE
from app.routing.routes import RouteStates


@dataclass(frozen=True)
class RouteStatus:
    route: str
    stage: str
    auto: bool
    teacher: str
    student: str | None
    student_share: float  # of the traffic the student answers at this stage
    success: Rate  # the student's judged calls in this stage (what the gates read)
    since: datetime | None
    cost: RouteCost | None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["saving"] = self.cost.saving if self.cost else None
        return data


def route_status(settings: Settings, store: Any, names: list[str] | None = None) -> list[RouteStatus]:
    states = RouteStates(settings, store)
    costs = {c.route: c for c in summarize(store.usage_summary())}
    out = []
    for name in names or sorted({*settings.route_names(), *store.route_states()}):
        route = states.get(name)
        since = route.since or datetime.min
        outcomes = store.student_outcomes(name, since) if route.student else None
        out.append(RouteStatus(
            route=name, stage=route.stage, auto=route.auto, teacher=route.teacher.name,
            student=route.student.name if route.student else None,
            student_share=STUDENT_SHARE[route.stage] if route.student else 0.0,
            success=wilson(outcomes.successes, outcomes.trials) if outcomes else wilson(0, 0),
            since=route.since, cost=costs.get(name),
        ))
    return out
