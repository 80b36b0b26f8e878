"""Retries of upstream calls, in one place: bounded attempts, jittered exponential backoff, `Retry-After` honoured.

What is retried: HTTP 408, 409, 429 and 5xx, and failures to connect. What is not: timeouts (a stalled upstream
would only stall again, multiplying the wait) and every other status (the request itself is wrong). The SDK's
own retries are off (`max_retries=0` on the client), so attempts are never multiplied.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

T = TypeVar("T")
RETRIED_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0  # the longest wait a Retry-After gets; past that the request would look hung
BACKOFF_S, MAX_BACKOFF_S = 0.5, 8.0  # full jitter: uniform(0, min(8, 0.5 * 2 ** (failures - 1))) seconds


def is_retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return False
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRIED_STATUS
    return isinstance(exc, openai.APIConnectionError)


def retry_after(exc: BaseException | None) -> float | None:
    """The seconds an upstream asked us to wait (`retry-after-ms` or `retry-after` in seconds), if it did."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name)) * scale)
        except (TypeError, ValueError):
            continue
    return None


def pause(exc: BaseException | None, failures: int) -> float:
    """Seconds to wait after the `failures`-th failed attempt: what the upstream asked (capped), else jittered
    exponential backoff."""
    asked = retry_after(exc)
    if asked is not None:
        return min(asked, MAX_RETRY_AFTER_S)
    return random.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (failures - 1)))


async def with_retries(call: Callable[[], Awaitable[T]], retries: int,
                       sleep: Callable[[float], Awaitable[Any]] | None = None) -> T:
    """`await call()`, retried up to `retries` more times on a retryable failure; the last failure is raised.

    The first attempt is made directly (it is nearly every call, and tenacity's bookkeeping is a measurable share
    of the proxy's added latency); after a retryable failure tenacity makes the rest, its waits counted from there.
    """
    try:
        return await call()
    except Exception as exc:
        if retries <= 0 or not is_retryable(exc):
            raise
        first = exc
    await (sleep or asyncio.sleep)(pause(first, 1))

    def wait(state: RetryCallState) -> float:  # tenacity's attempt n is the call's attempt n + 1
        return pause(state.outcome.exception() if state.outcome else None, state.attempt_number + 1)

    kwargs = {"sleep": sleep} if sleep is not None else {}
    async for attempt in AsyncRetrying(stop=stop_after_attempt(retries), wait=wait,
                                       retry=retry_if_exception(is_retryable), reraise=True, **kwargs):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity either returns or re-raises")
