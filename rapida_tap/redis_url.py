"""``redis://`` URLs for ``--contexts``: parsed once, and never shown with their password."""

from __future__ import annotations

import dataclasses
from urllib.parse import unquote, urlsplit

DEFAULT_PORT = 6379


class RedisURLError(ValueError):
    """A ``--contexts`` Redis URL that cannot be used; the message never contains the password."""


@dataclasses.dataclass(frozen=True)
class RedisAddress:
    """Where and how to reach Redis; ``str()`` is the URL with the password masked."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        elif self.username:
            auth = f"{self.username}@"
        return f"redis://{auth}{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """Parse ``redis://[[user]:password@]host[:port][/db]`` (port 6379 and db 0 by default).

    Percent-escapes in user and password are decoded.  Raises ``RedisURLError``.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise RedisURLError(f"not a valid Redis URL: {_mask(url)} ({e})") from None
    if parts.scheme != "redis":
        raise RedisURLError(f"Redis URL must start with redis:// : {_mask(url)}")
    if not parts.hostname:
        raise RedisURLError(f"Redis URL has no host: {_mask(url)}")
    if parts.query or parts.fragment:
        raise RedisURLError(f"Redis URL takes no query or fragment: {_mask(url)}")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise RedisURLError(f"Redis database must be a number: {_mask(url)}")
    return RedisAddress(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORT,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _mask(url: str) -> str:
    """``url`` with everything between ``://`` and the last ``@`` of its authority hidden."""
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    if sep and "@" in authority:
        return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{tail}"
    return url
