"""API keys: compared in constant time, never logged."""

from __future__ import annotations

import hmac
import secrets


def generate_api_key() -> str:
    """A fresh key for a daemon started without one (logged once, at start-up)."""
    return "rpd-" + secrets.token_urlsafe(24)


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one API key is required")
        self._keys = [k.encode("utf-8") for k in keys]

    def check(self, presented: str | bytes | None) -> bool:
        """True if ``presented`` is one of the keys.

        Every key is compared, whatever matches, so timing tells nothing about which key
        (or how much of one) was right.
        """
        if not presented:
            return False
        candidate = presented if isinstance(presented, bytes) else presented.encode("utf-8")
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(candidate, key)
        return found

    def __repr__(self) -> str:
        return f"<ApiKeys: {len(self._keys)} key(s)>"
