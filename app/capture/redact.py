"""Strip credentials from data before the capture store writes it.

A value under a key named like a credential (api_key, Authorization, x-api-key, client_secret, password, ...)
becomes "[redacted]", and inside any string the secrets app/secrets.py knows (registered key values, bearer tokens,
`sk-...` keys, URL credentials) are replaced in place. Keys directly inside a JSON-schema "properties" mapping are
parameter names, not credentials, so a tool with a `password` parameter keeps its schema. Configured extra
patterns (e-mail addresses by default) are redacted in captured text as well.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from app.secrets import REDACTED, might_hold_secret, redact_text, register_secret  # noqa: F401 (re-exported)

try:
    import orjson
except ImportError:  # optional: only makes the quick check below quicker
    orjson = None

_SECRET_WORDS = ("api_key", "apikey", "authorization", "secret", "password", "passwd", "access_token",
                 "refresh_token", "auth_token")
# Short pieces, one of which the lowered JSON text of anything redactable must contain: each secret word holds
# one of the last six (tests check it) and each token pattern starts with one of the first two. Few and short,
# because each is one scan of the text; a false alarm only costs the slower walk. Registered values and URL
# credentials are checked by app.secrets.might_hold_secret.
_NEEDLES = ("sk-", "bearer", "auth", "secret", "passw", "key", "access", "refresh")
_PLAIN = {bool, int, float}
# Extra patterns for captured text (`[capture] redact_patterns`; e-mail addresses by default), set by
# configure_patterns. Each may name a substring that any match contains, so text without it skips the regex.
EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
_patterns: list[re.Pattern] = []
_pattern_needles: list[str | None] = []


def configure_patterns(patterns: list[str]) -> None:
    """Redact what these regular expressions match in captured text too (replaces the previous list)."""
    compiled = [re.compile(p) for p in patterns]
    _patterns[:] = compiled
    _pattern_needles[:] = ["@" if p == EMAIL else None for p in patterns]


def _scrub(text: str) -> str:
    for pattern, needle in zip(_patterns, _pattern_needles):
        if needle is None or needle in text:
            text = pattern.sub(REDACTED, text)
    return text


def redact(value: Any) -> Any:
    """`value` (dicts, lists, strings, scalars) with credentials replaced by "[redacted]"; never changes its input.

    Returns `value` itself when nothing in it needs redacting.

    >>> redact({"headers": {"Authorization": "Bearer abc"}, "note": "key sk-abcdefghijklmnop1234"})
    {'headers': {'Authorization': '[redacted]'}, 'note': 'key [redacted]'}
    """
    if isinstance(value, str):
        return _scrub(redact_text(value))
    if isinstance(value, (dict, list, tuple)) and _might_hold_secret(value):
        return _walk(value, schema_properties=False)
    return value


def langfuse_mask(*, data: Any, **kwargs: Any) -> Any:
    """`Langfuse(mask=langfuse_mask)`: every span's input, output and metadata redacted before export."""
    return redact(data)


@lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    lowered = key.lower().replace("-", "_")
    return any(word in lowered for word in _SECRET_WORDS)


def _might_hold_secret(value: dict | list | tuple) -> bool:
    """False only when no key or string in `value` can need redacting (one scan of its JSON text).

    Every request passes through here, and walking the structure in Python costs several times more.
    """
    try:
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode() if orjson else None
    except TypeError:
        text = None
    if text is None:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    lowered = text.lower()
    if any(needle is None or needle in text for needle in _pattern_needles):
        return True
    return any(needle in lowered for needle in _NEEDLES) or might_hold_secret(text, lowered)


def _walk(value: Any, schema_properties: bool) -> Any:
    if isinstance(value, str):
        return _scrub(redact_text(value))
    if isinstance(value, dict):
        return {k: _walk_item(k, v, schema_properties) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, False) for v in value]
    return value


def _walk_item(key: Any, value: Any, schema_properties: bool) -> Any:
    if value is not None and not schema_properties and isinstance(key, str) and is_secret_key(key):
        return REDACTED
    if type(value) in _PLAIN:
        return value
    return _walk(value, schema_properties=key == "properties")
