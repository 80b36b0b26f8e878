"""A circuit breaker per binding: after `threshold` failures in a row a binding is skipped for `cooldown_s`, then one
call probes it; success closes the circuit, failure opens it again. Pure state plus an injectable clock.

Only backend failures count (errors, timeouts); an invalid answer is the model's, not the binding's health.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import BackendError


class CircuitOpen(BackendError):
    """The binding failed too often lately and is being skipped until its cool-down ends."""


@dataclass
class _State:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class Breakers:
    def __init__(self, threshold: int = 5, cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.threshold, self.cooldown_s, self.clock = threshold, cooldown_s, clock
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    def check(self, binding: str) -> None:
        """Raise CircuitOpen when `binding` must be skipped now; let one probe through after the cool-down."""
        with self._lock:
            state = self._states.get(binding)
            if state is None or state.opened_at is None:
                return
            waited = self.clock() - state.opened_at
            if waited < self.cooldown_s or state.probing:
                left = max(0.0, self.cooldown_s - waited)
                raise CircuitOpen(f"{binding} is skipped: it failed {state.failures} times in a row; it is tried "
                                  f"again in {left:.0f} s")
            state.probing = True

    def record(self, binding: str, ok: bool) -> None:
        with self._lock:
            state = self._states.setdefault(binding, _State())
            if ok:
                self._states[binding] = _State()
                return
            state.failures += 1
            state.probing = False
            if state.failures >= self.threshold:
                state.opened_at = self.clock()

    def is_open(self, binding: str) -> bool:
        with self._lock:
            state = self._states.get(binding)
            return bool(state and state.opened_at is not None)
