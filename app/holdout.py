"""The held-out split of captured calls: one rule, read by evaluation (which scores on it), dataset building and
template evolution (which must never learn from it). It lives in `app/` so `prompts/` and `training/` share it.

A captured call is held out when the first 8 hex digits of sha256(call id) mod 100 fall below HELD_OUT_PERCENT:
stable across machines and store order.
"""

from __future__ import annotations

import hashlib

HELD_OUT_PERCENT = 20


def is_held_out(call_id: str, percent: int = HELD_OUT_PERCENT) -> bool:
    """Whether a captured call belongs to the evaluation split (stable: a hash of its id only).

    >>> is_held_out("0" * 32), is_held_out("9" * 32)
    (False, True)
    """
    return int(hashlib.sha256(call_id.encode()).hexdigest()[:8], 16) % 100 < percent
