"""Prices calls: USD for what a binding used, and what the route's teacher would have charged for the same request.

Hosted bindings are priced per token (USD per million, input and output; the table below, or `price_in` /
`price_out` options). Local bindings are not free: their calls cost the machine's `usd_per_hour` (the binding's
option, else `[cost] usd_per_hour`) times the call's compute time. The counterfactual (the teacher's price) uses the
answer's own token counts: the teacher's tokenizer is not at hand, so this is an estimate, and reports say so.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

from app.backends.base import pricing_of
from app.bindings import Binding

# (input, output) USD per 1M tokens, list prices of the hosted models teams most often start from.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4": (30.0, 60.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1-nano": (0.1, 0.4),
    "gpt-3.5-turbo": (0.5, 1.5),
}


def price(binding: Binding) -> tuple[float, float]:
    """(input, output) USD per 1M tokens for a binding.

    Explicit `price_in`/`price_out` options win; local kinds cost nothing per token; a hosted model missing
    from the table is priced as gpt-4 (teams move off GPT-4 class deployments, whose names say nothing). A binding
    kind that no backend registered raises BindingError rather than being priced by guess.
    """
    explicit = _explicit_price(binding)
    if explicit is not None:
        return explicit
    if pricing_of(binding.kind) == "local":
        return (0.0, 0.0)
    return PRICES.get(_model_key(binding.target), PRICES["gpt-4"])


def _explicit_price(binding: Binding) -> tuple[float, float] | None:
    opts = binding.options
    if opts.price_in is None and opts.price_out is None:
        return None
    return (opts.price_in or 0.0, opts.price_out or 0.0)


def cost_usd(binding: Binding, prompt_tokens: int, completion_tokens: int, seconds: float = 0.0,
             usd_per_hour: float = 0.0) -> float:
    """What a call with these token counts, taking `seconds` of compute, costs on this binding.

    >>> from app.bindings import parse_binding
    >>> round(cost_usd(parse_binding("azure:gpt-4o"), 1000, 500), 6)
    0.0075
    >>> round(cost_usd(parse_binding("gguf:smollm2-135m"), 1000, 500, seconds=36.0, usd_per_hour=1.0), 6)
    0.01
    """
    if pricing_of(binding.kind) == "local" and _explicit_price(binding) is None:
        rate = getattr(binding.options, "usd_per_hour", None)
        return (usd_per_hour if rate is None else rate) * seconds / 3600
    p_in, p_out = price(binding)
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1_000_000


@functools.lru_cache(maxsize=1024)  # priced on every call
def _model_key(target: str) -> str:
    """Longest table key that the deployment/model name starts with (`gpt-4o-2024-08-06` → `gpt-4o`)."""
    name = target.lower()
    matches = [key for key in PRICES if name == key or name.startswith(key + "-")]
    return max(matches, key=len) if matches else target


@dataclass(frozen=True)
class RouteCost:
    """A route's spend against what its teacher alone would have cost for the same answers."""

    route: str
    calls: dict[str, int]  # answers per role (teacher, student), plus shadow runs
    spend: float  # everything that ran: answers, replaced student attempts, shadows
    counterfactual: float  # the teacher's price for the answers (on the answers' own token counts)
    fallbacks: dict[str, int]

    @property
    def saving(self) -> float | None:
        """1 - spend / counterfactual; None before anything was priced."""
        return 1 - self.spend / self.counterfactual if self.counterfactual > 0 else None


def summarize(rows: list[dict]) -> list[RouteCost]:
    """Per-route totals from `CaptureStore.usage_summary()` rows (pure).

    >>> summarize([{"route": "r", "role": "student", "fallback_reason": None, "replaced": False, "calls": 3,
    ...             "cost_usd": 0.003, "teacher_cost_usd": 0.03}])[0].saving
    0.9
    """
    out: dict[str, dict] = {}
    for row in rows:
        r = out.setdefault(row["route"], {"calls": {}, "spend": 0.0, "counterfactual": 0.0, "fallbacks": {}})
        r["spend"] += row["cost_usd"]
        if row["role"] == "shadow":
            r["calls"]["shadow"] = r["calls"].get("shadow", 0) + row["calls"]
            continue
        if row["replaced"]:
            continue  # the teacher's fallback row answers this request and carries its counterfactual
        r["calls"][row["role"]] = r["calls"].get(row["role"], 0) + row["calls"]
        r["counterfactual"] += row["teacher_cost_usd"]
        if row["fallback_reason"]:
            r["fallbacks"][row["fallback_reason"]] = r["fallbacks"].get(row["fallback_reason"], 0) + row["calls"]
    return [RouteCost(route=name, **values) for name, values in sorted(out.items())]
