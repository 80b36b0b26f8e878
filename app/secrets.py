"""The secrets this process holds, and the one function that removes them from text before it leaves the process.

    register_secret(os.environ["MY_KEY"])       # a backend, when it reads a key
    register_settings(settings)                 # each binding's api_key_env, base_url passwords, the Langfuse key
    redact_text("HTTP 401: bad key abc…")       # registered values, bearer/sk- tokens, URL credentials -> [redacted]
    install_log_redaction()                     # every log record redacted before any handler sees it

The values of OPENAI_API_KEY, AZURE_OPENAI_API_KEY and LANGFUSE_SECRET_KEY are registered at import, and again (with
each binding's api_key_env) by register_settings. Pure stdlib: app/errors.py imports this module.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 8  # shorter values ("test", "1") would redact ordinary words everywhere
# Variables whose values are secrets whatever the config says; LANGFUSE_PUBLIC_KEY is not a secret.
SECRET_ENV = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "LANGFUSE_SECRET_KEY")
# Query parameters that carry a credential (`?api_key=…`, `&key=…`); `api_key_env=VAR` names a variable and stays.
SECRET_PARAMS = ("api_key", "api-key", "apikey", "key", "access_token", "token", "auth", "secret", "client_secret",
                 "password", "sig", "signature")

# A bearer token has at least 16 token characters and a digit, so prose like "the bearer of bad news" stays.
_TOKENS = re.compile(r"\bbearer\s+(?=[\w.~+/-]*\d)[\w.~+/-]{16,}=*|\bsk-[A-Za-z0-9_-]{16,}", re.IGNORECASE)
# scheme://userinfo@: greedy up to the last "@" before the path, so an unescaped "@" in a password is covered too.
_URL_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^\s/?#\"'<>]*@", re.IGNORECASE)
_SECRET_PARAM = re.compile(r"([?&;](?:%s)=)[^&;#\s\"'<>]+" % "|".join(re.escape(p) for p in SECRET_PARAMS),
                           re.IGNORECASE)
_PARAM_NEEDLES = tuple(f"{p}=" for p in ("key", "token", "auth", "secret", "password", "sig"))

_lock = threading.Lock()
_values: frozenset[str] = frozenset()
_env_names: frozenset[str] = frozenset(SECRET_ENV)
_sorted_values: tuple[str, ...] = ()


def register_secret(value: str | None) -> None:
    """Redact `value` from everything this process writes from now on; None and values under 8 chars are ignored."""
    global _values, _sorted_values
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH or value in _values:
        return
    with _lock:  # copy-on-write: redact_text reads the values without a lock
        _values = _values | {value} | _escaped_forms(value)
        _sorted_values = tuple(sorted(_values, key=len, reverse=True))


def register_secret_env(name: str) -> None:
    """Treat the value of environment variable `name` as a secret, now and whenever register_env_secrets runs."""
    global _env_names
    if name and name not in _env_names:
        with _lock:
            _env_names = _env_names | {name}
    register_secret(os.environ.get(name))


def register_env_secrets() -> None:
    """Register the current values of the secret variables (SECRET_ENV and those registered by name).

    Runs at import and from register_settings; reading the environment at each redaction would cost more than
    the rest of the quick check.
    """
    for name in _env_names:
        register_secret(os.environ.get(name))


def register_settings(settings: Any) -> None:
    """Register the secrets a config points at: each binding's `api_key_env`, passwords in `base_url`s, the
    Langfuse secret key. Bindings that do not parse are skipped (loading the config reports them)."""
    register_env_secrets()
    for text in _binding_strings(settings):
        try:
            options = settings.binding(text).options
        except Exception:
            continue
        if name := getattr(options, "api_key_env", None):
            register_secret_env(name)
        register_url_secrets(getattr(options, "base_url", None))
    secret = getattr(getattr(settings, "langfuse", None), "secret_key", None)
    if secret is not None:
        register_secret(secret.get_secret_value())


def register_url_secrets(url: str | None) -> None:
    """Register the password (and secret query values) of `url`, so they are caught even where not in URL form."""
    if not url:
        return
    parts = urlsplit(url)
    if parts.password:
        user, password = unquote(parts.username or ""), unquote(parts.password)
        register_secret(password)
        # httpx sends URL credentials as Basic auth, and an upstream may echo that header back.
        register_secret(base64.b64encode(f"{user}:{password}".encode()).decode())
    for name, value in parse_qsl(parts.query):
        if name.lower() in SECRET_PARAMS:
            register_secret(value)


def secret_values() -> tuple[str, ...]:
    """Every registered secret value, longest first (so a secret that contains another is replaced whole)."""
    return _sorted_values


def might_hold_secret(text: str, lowered: str | None = None) -> bool:
    """False only when `redact_text(text)` would return `text` unchanged: a few substring scans, no regex."""
    lowered = text.lower() if lowered is None else lowered
    if "sk-" in lowered or "bearer" in lowered:
        return True
    # One-character checks first: they run at memchr speed, the longer needles only when they hit.
    if "@" in text and "://" in text:
        return True
    if "=" in text and any(needle in lowered for needle in _PARAM_NEEDLES):
        return True
    return any(value in text for value in _sorted_values)


def redact_text(text: str) -> str:
    """`text` with registered secret values, bearer tokens, sk- keys and URL credentials replaced by "[redacted]".

    >>> redact_text("GET https://bob:hunter22@host/v1?key=abc123 with Bearer abcdefghij0123456789")
    'GET https://[redacted]@host/v1?key=[redacted] with [redacted]'
    """
    if not isinstance(text, str) or not might_hold_secret(text):
        return text
    for value in secret_values():
        text = text.replace(value, REDACTED)
    text = _TOKENS.sub(REDACTED, text)
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    return _SECRET_PARAM.sub(rf"\1{REDACTED}", text)


def strip_url_credentials(url: str | None) -> str | None:
    """`url` without its user:password and with secret query values redacted: what to show or store of a URL.

    >>> strip_url_credentials("http://user:pw@127.0.0.1:8000/v1?api_key=abc&x=1")
    'http://127.0.0.1:8000/v1?api_key=[redacted]&x=1'
    """
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL we can take apart: the text rules still apply
        return redact_text(url)
    if "@" in parts.netloc:
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return redact_text(url)


# ---- logging -------------------------------------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """Redacts a record in place: its message (arguments merged in), traceback and stack. Always lets it through."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad arguments: logging reports that itself when the record is emitted
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Formatted here, so the handler's formatter uses the redacted text instead of formatting it again.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


_FILTER = RedactingFilter()
_installed = False


def install_log_redaction() -> None:
    """Redact every log record of the process when it is made, before any handler (present or added later) sees it.

    A filter on the root logger would miss records of child loggers, which skip logger filters on the way up; the
    record factory sees them all. Idempotent.
    """
    global _installed
    with _lock:
        if _installed:
            return
        make = logging.getLogRecordFactory()

        def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make(*args, **kwargs)
            _FILTER.filter(record)
            return record

        logging.setLogRecordFactory(redacted_record)
        _installed = True


# ---- helpers -------------------------------------------------------------------------------------------------


def _escaped_forms(value: str) -> set[str]:
    """The value as it appears inside JSON text, when that differs (a quote or backslash in a password)."""
    escaped = {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    return {form for form in escaped if form != value}


def _binding_strings(settings: Any) -> set[str]:
    texts = {settings.default_binding, *settings.bindings}
    for route in settings.routes.values():
        texts.update(b for b in (route.teacher, route.student) if b)
    return {t for t in texts if isinstance(t, str)}


register_env_secrets()
