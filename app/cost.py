"""Prices calls: USD for the tokens a binding used, and what the route's teacher would have charged for them.

Prices are USD per million tokens (input, output). Local bindings cost nothing by default; any binding can set
`price_in` / `price_out` options (inline or in `[bindings]`) to override the table, e.g. to charge GPU time.
"""

from __future__ import annotations

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
    opts = binding.options
    if opts.price_in is not None or opts.price_out is not None:
        return (opts.price_in or 0.0, opts.price_out or 0.0)
    if pricing_of(binding.kind) == "local":
        return (0.0, 0.0)
    return PRICES.get(_model_key(binding.target), PRICES["gpt-4"])


def cost_usd(binding: Binding, prompt_tokens: int, completion_tokens: int) -> float:
    """What a call with these token counts costs on this binding.

    >>> from app.bindings import parse_binding
    >>> round(cost_usd(parse_binding("azure:gpt-4o"), 1000, 500), 6)
    0.0075
    """
    p_in, p_out = price(binding)
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1_000_000


def _model_key(target: str) -> str:
    """Longest table key that the deployment/model name starts with (`gpt-4o-2024-08-06` → `gpt-4o`)."""
    name = target.lower()
    matches = [key for key in PRICES if name == key or name.startswith(key + "-")]
    return max(matches, key=len) if matches else target
