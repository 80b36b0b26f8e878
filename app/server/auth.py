"""API keys for the proxy: the config holds only SHA-256 hashes, so a leaked config leaks no key.

`slmswap keys new` prints a fresh key and the hash to put in `[proxy] api_keys`. A request's bearer key is hashed
and compared to each configured hash in constant time; the hash (not the key) identifies the caller in captures.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets

KEY_PREFIX = "sk-slmswap-"


def new_key() -> tuple[str, str]:
    """A fresh API key and its hash (`sha256:<hex>`).

    >>> key, digest = new_key(); key.startswith("sk-slmswap-") and digest == hash_key(key)
    True
    """
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def normalise_hash(value: str) -> str:
    """`sha256:<64 hex>` from either that or the bare hex; ValueError for anything else (a key pasted by mistake)."""
    text = value.strip().lower().removeprefix("sha256:")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError("an api_keys entry must be a SHA-256 hash (sha256:<64 hex digits>), not a key; "
                         "make one with `slmswap keys new`")
    return "sha256:" + text


def check_key(authorization: str | None, hashes: list[str]) -> str | None:
    """The matching hash for an `Authorization: Bearer <key>` header, or None."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    digest = hash_key(key.strip())
    match = None
    for known in hashes:  # compare against every hash, so timing does not tell which one matched
        if hmac.compare_digest(digest, known):
            match = known
    return match


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: the only addresses an unauthenticated proxy may bind."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
