"""The retry schedule of upstream calls (app/backends/retry.py), with a recording sleep: what is retried, how long
each wait is (Retry-After honoured and capped, else jittered exponential backoff), and the attempt bound."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from app.backends.retry import MAX_RETRY_AFTER_S, with_retries


def status(code: int, **headers: str) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://upstream/v1/chat/completions")
    return openai.APIStatusError(f"status {code}", response=httpx.Response(code, headers=headers, request=request),
                                 body=None)


def run(outcomes: list, retries: int) -> tuple[object, list[float], int]:
    """with_retries over a call that raises or returns `outcomes` in turn: (result, the waits, calls made)."""
    waits: list[float] = []
    calls = 0

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def call():
        nonlocal calls
        calls += 1
        outcome = outcomes[calls - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return asyncio.run(with_retries(call, retries, sleep=sleep)), waits, calls


def test_a_first_success_makes_one_call_and_never_waits():
    assert run(["ok"], retries=3) == ("ok", [], 1)


def test_retry_after_is_honoured_then_backoff_grows_with_the_failures():
    result, waits, calls = run([status(429, **{"retry-after": "2"}), status(503), status(503), "ok"], retries=3)
    assert (result, calls) == ("ok", 4)
    assert waits[0] == 2.0  # what the upstream asked
    assert 0 <= waits[1] <= 1.0 and 0 <= waits[2] <= 2.0  # full jitter under 0.5 * 2 ** (failures - 1)


def test_retry_after_ms_wins_and_a_huge_retry_after_is_capped():
    _, waits, _ = run([status(429, **{"retry-after-ms": "250"}), status(429, **{"retry-after": "86400"}), "ok"],
                      retries=2)
    assert waits == [0.25, MAX_RETRY_AFTER_S]


def test_attempts_are_bounded_and_the_last_failure_is_raised():
    last = status(500)
    with pytest.raises(openai.APIStatusError) as caught:
        run([status(500), status(500), last, "never"], retries=2)
    assert caught.value is last


@pytest.mark.parametrize("error", [status(400), status(401), openai.APITimeoutError(
    request=httpx.Request("POST", "http://upstream/v1"))])
def test_client_errors_and_timeouts_are_not_retried(error):
    with pytest.raises(type(error)):
        run([error, "ok"], retries=3)


def test_no_retries_configured_means_one_attempt():
    with pytest.raises(openai.APIStatusError):
        run([status(503), "ok"], retries=0)
