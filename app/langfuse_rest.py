"""Langfuse's REST API (datasets, prompts) through the real SDK client, and the one place its failures become ours.

Datasets and prompt management reuse the process's client from `app/observability.py` (the SDK keeps one per
public key anyway). Every failure names the host and what was being done, never a key:

    langfuse, host = rest_client(settings)               # UsageError (exit 2) without keys
    with rest_errors(host, "reading dataset 'faq'"):
        dataset = langfuse.get_dataset("faq")
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.config import Settings
from app.errors import SlmSwapError, UsageError
from app.secrets import strip_url_credentials

KEYS_HINT = "check LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY (or [langfuse] in slmswap.toml)"


class LangfuseError(SlmSwapError):
    """Langfuse could not be reached, or failed while answering (exit 1): nothing local was changed."""

    error_type = "langfuse_error"


class LangfuseNotFound(UsageError):
    """The dataset or prompt named does not exist on that Langfuse host (exit 2)."""


def rest_client(settings: Settings) -> tuple[Any, str]:
    """The process's `langfuse.Langfuse` and the host it talks to; UsageError naming the variables without keys."""
    from app import observability

    keys = observability.langfuse_keys(settings)
    if keys is None:
        _, why = observability.off_message(settings)
        raise UsageError(why.replace("Langfuse tracing is off", "Langfuse is not configured")
                         .replace("to trace runs", "to use Langfuse datasets and prompts"))
    return observability.client(settings), strip_url_credentials(keys.url)


@contextmanager
def rest_errors(host: str, doing: str, after: str = "nothing was changed locally") -> Iterator[None]:
    """Turn what the SDK raises (its API errors, httpx's transport errors) into LangfuseError / UsageError;
    `after` says what state the failure left (appended to transport and server errors).

    The SDK also logs its own generic line for each API error ("Unauthorized. Please check your public/private host
    settings…"); it is silenced here, since the error raised says more.
    """
    import httpx
    from langfuse.api.core import ApiError

    from app.observability import describe_error

    quiet = _Quiet()
    sdk_log = logging.getLogger("langfuse")
    sdk_log.addFilter(quiet)
    try:
        yield
    except ApiError as exc:
        raise _api_error(host, doing, exc, after) from None
    except httpx.TransportError as exc:
        raise LangfuseError(f"cannot reach Langfuse at {host} while {doing} ({describe_error(exc)}); check "
                            f"LANGFUSE_HOST and that the server is up ({after})") from None
    finally:
        sdk_log.removeFilter(quiet)


def _api_error(host: str, doing: str, exc: Any, after: str) -> SlmSwapError:
    status = exc.status_code
    detail = _message(exc.body)
    if status in (401, 403):
        return UsageError(f"Langfuse at {host} refused the keys (HTTP {status}) while {doing}; {KEYS_HINT}")
    if status == 404:
        return LangfuseNotFound(f"Langfuse at {host} has no such resource (HTTP 404) while {doing}"
                                f"{': ' + detail if detail else ''}")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return UsageError(f"Langfuse at {host} rejected the request (HTTP {status}) while {doing}: {detail}")
    return LangfuseError(f"Langfuse at {host} failed (HTTP {status}) while {doing}{': ' + detail if detail else ''}; "
                         f"try again later ({after})")


def _message(body: Any) -> str:
    if isinstance(body, dict):
        body = body.get("message") or body.get("error") or body
    return str(body)[:300] if body else ""


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR
