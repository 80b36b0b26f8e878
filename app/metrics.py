"""The scores the serving path needs too: exact match of tool calls and the Wilson interval of a success rate.

Rollout gates (app/routing/rollout.py) judge a student with these, and training's evaluation reports them, so a
student is promoted by exactly the rule it was measured with. Pure functions over plain data.

Normalisation: numbers compare by value (1 == 1.0), booleans are not numbers, strings are stripped and their
whitespace runs collapsed (case kept), dicts and lists recurse (list order kept).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import UsageError
from app.hermes import ParsedCall

# ---- normalisation and exact match -----------------------------------------------------------------------


def normalize_value(value: Any) -> Any:
    """A hashable canonical form: equal forms mean equal values under the module's rules."""
    if isinstance(value, bool) or value is None:
        return ("lit", value)
    if isinstance(value, int):
        return ("num", value)
    if isinstance(value, float):
        return ("num", int(value) if value.is_integer() else value)
    if isinstance(value, str):
        return ("str", " ".join(value.split()))
    if isinstance(value, Mapping):
        return ("obj", tuple(sorted((str(k), normalize_value(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("arr", tuple(normalize_value(v) for v in value))
    return ("other", repr(value))


def _call_key(call: ParsedCall) -> tuple:
    return call.name, normalize_value(call.arguments)


def exact_match(pred: Sequence[ParsedCall], ref: Sequence[ParsedCall]) -> bool:
    """Same calls with the same normalised arguments, in any order (a multiset match, for parallel calls)."""
    return Counter(map(_call_key, pred)) == Counter(map(_call_key, ref))


# ---- Wilson interval ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    k: int
    n: int
    rate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.rate:.1%} [{self.low:.1%}, {self.high:.1%}] ({self.k}/{self.n})"


def wilson(k: int, n: int, z: float = 1.96) -> Rate:
    """k successes in n trials with the Wilson score interval (95% for z=1.96); n == 0 gives rate 0 in [0, 1].

    >>> str(wilson(7, 10))
    '70.0% [39.7%, 89.2%] (7/10)'
    """
    if n == 0:
        return Rate(0, 0, 0.0, 0.0, 1.0)
    if not 0 <= k <= n:
        raise UsageError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Rate(k, n, p, max(0.0, centre - half), min(1.0, centre + half))
