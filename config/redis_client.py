"""Reaching a Redis: a plain ``redis://`` URL, or a master found through Redis Sentinel.

A Sentinel URL is kombu's: the sentinels, each ``sentinel://``, joined by ``;``, the
database number and the master's password on them (as the first one says)::

    sentinel://:PASSWORD@10.0.0.1:26379;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379/0

The master's name (``REDIS_SENTINEL_MASTER``) and the sentinels' own password
(``REDIS_SENTINEL_PASSWORD``, when they ask for one) are settings. Every client made
here asks the sentinels for the master on each new connection, so after a failover a
broken connection is replaced by one to the promoted replica; Celery's broker and result
backend (kombu), beat (celery-redbeat) and the rate limit (limits) are told the same
through their own options (config.celeryconf, orders.api.limits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from redis import Redis
from redis.sentinel import Sentinel

SCHEME = "sentinel"


@dataclass(frozen=True)
class SentinelAccess:
    """What a Sentinel URL does not say: the master's name and the sentinels' password."""

    master: str
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SentinelTarget:
    """A Sentinel URL, read."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names sentinels rather than one Redis."""
    return url.startswith(f"{SCHEME}://")


def parse(url: str) -> SentinelTarget:
    """Read a Sentinel URL; ValueError when it is not one."""
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for n, chunk in enumerate(part for part in url.split(";") if part.strip()):
        parts = urlsplit(chunk.strip())
        if parts.scheme != SCHEME or not parts.hostname:
            raise ValueError(f"not a sentinel:// address: {parts.scheme}://{parts.hostname}")
        sentinels.append((parts.hostname, parts.port or 26379))
        if n == 0 or parts.password:
            username = unquote(parts.username) if parts.username else username
            password = unquote(parts.password) if parts.password else password
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"a sentinel URL's database is a number, not {path!r}")
            db = int(path)
    if not sentinels:
        raise ValueError("a sentinel URL names at least one sentinel")
    return SentinelTarget(tuple(sentinels), db, username, password)


def sentinel_kwargs(access: SentinelAccess, **options: Any) -> dict[str, Any]:
    """The options of the connections to the sentinels themselves."""
    kwargs = {key: value for key, value in options.items() if key.startswith("socket_")}
    if access.password:
        kwargs["password"] = access.password
    return kwargs


def connect(url: str, access: SentinelAccess | None = None, **options: Any) -> Redis:
    """A client of the Redis at ``url``; through the sentinels for a Sentinel URL (then
    ``access`` names the master). ``options`` are redis-py's connection options."""
    if not is_sentinel(url):
        return Redis.from_url(url, **options)
    if access is None:
        raise ValueError("a sentinel URL needs the master's name (REDIS_SENTINEL_MASTER)")
    target = parse(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs=sentinel_kwargs(access, **options)
    )
    master: Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        access.master,
        db=target.db,
        username=target.username,
        password=target.password,
        **options,
    )
    return master
