"""Prometheus metrics of the proxy, in a registry of its own (not the process-global one).

Per route: requests by role and status, errors by type, fallbacks by reason, latency, tokens, cost and the cost the
teacher would have had, and the rollout stage (0 teacher … 4 student).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from app.routing.rollout import STAGES
from app.wire import CallInfo, Usage

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slmswap_requests", "Chat requests answered", ["route", "role", "status"], registry=r)
        self.errors = Counter("slmswap_errors", "Requests that ended in an error", ["route", "type"], registry=r)
        self.latency = Histogram("slmswap_request_latency_seconds", "Time to answer", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("slmswap_tokens", "Tokens", ["route", "kind"], registry=r)
        self.cost = Counter("slmswap_cost_usd", "What the answers cost", ["route"], registry=r)
        self.counterfactual = Counter("slmswap_counterfactual_cost_usd", "What the teacher would have cost",
                                      ["route"], registry=r)
        self.stage = Gauge("slmswap_stage", "Rollout stage: 0 teacher, 1 shadow, 2 canary, 3 half, 4 student",
                           ["route"], registry=r)
        self._router = None
        self._children: dict[tuple, tuple] = {}  # (route, role) -> the labelled series a success moves
        r.register(self)  # collect() below reports the Router's own counts

    def watch(self, router) -> None:
        self._router = router

    def collect(self):
        """Fallbacks by reason and shed shadows, as the Router counts them (it serves the graph too)."""
        fallbacks = CounterMetricFamily("slmswap_fallbacks", "Student answers replaced by the teacher's",
                                        labels=["route", "reason"])
        shed = CounterMetricFamily("slmswap_shadow_shed", "Shadow runs dropped because the queue was full",
                                   labels=["route"])
        for (kind, route, reason), n in list(self._router.counts.items()) if self._router else []:
            if kind == "fallback":
                fallbacks.add_metric([route, reason], n)
            elif kind == "shadow_shed":
                shed.add_metric([route], n)
        yield fallbacks
        yield shed

    def answered(self, info: CallInfo | None, route: str, usage: Usage | None, seconds: float) -> None:
        role = info.role if info else "none"
        series = self._children.get((route, role))
        if series is None:  # `labels()` costs more than the increments: look each series up once
            series = self._children[route, role] = (
                self.requests.labels(route, role, "ok"), self.latency.labels(route),
                self.tokens.labels(route, "prompt"), self.tokens.labels(route, "completion"),
                self.cost.labels(route), self.counterfactual.labels(route))
        requests, latency, prompt, completion, cost, counterfactual = series
        requests.inc()
        latency.observe(seconds)
        if usage is not None:
            prompt.inc(usage.prompt_tokens)
            completion.inc(usage.completion_tokens)
        if info is not None:
            cost.inc(info.cost_usd)
            counterfactual.inc(info.teacher_cost_usd)

    def failed(self, route: str, error_type: str, seconds: float) -> None:
        self.requests.labels(route, "none", "error").inc()
        self.errors.labels(route, error_type).inc()
        self.latency.labels(route).observe(seconds)

    def render(self, router, routes: list[str]) -> bytes:
        """The text exposition, with each route's current stage."""
        for name in routes:
            self.stage.labels(name).set(STAGES.index(router.route(name).stage))
        return generate_latest(self.registry)
