"""Redis caches in front of PostgreSQL, which stays the truth.

Three caches, every key namespaced under ``orders:cache:`` and each with a lifetime or an
invalidating event:

- ``status:<order>``: an order's status, cache-aside, TTL 60 s; refreshed by the order's
  events (orders.projections).
- ``order:<order>``: a confirmed or cancelled order with its lines, no TTL; only final
  orders are cached, and the order's events remove it.
- ``credit:<customer>``: a customer's credit figures, TTL 300 s; written through by every
  change of them (reservation, release, confirmation) once it commits, and refreshed by
  the events of confirmation and cancellation.

Final orders' details have no TTL: the cache's Redis must evict (``maxmemory`` with an
``allkeys-*`` policy; ``make run`` and docker-compose.yml give the caches a Redis of
their own that does). ``eviction_warning`` tells when it does not.

Every value carries the version it was read at (the order's event seq, the customer's
credit version) and a write never replaces a newer value (one Lua script), so a slow
reader that fills the cache after an event was applied cannot bring an old status back
while the newer value is there. Once it has expired or been evicted, such a fill can:
the old value then lives at most its TTL (status 60 s, credit 300 s; details are
cached only for final orders, which do not change).

A cache that is down or slow is a miss: calls time out after ``CACHE_TIMEOUT_SECONDS``,
and after a failure the cache is left alone for a second (the API keeps answering from
PostgreSQL without paying the timeout on every request).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from prometheus_client import Counter
from redis.exceptions import RedisError

from config.redis_client import SentinelAccess, connect

logger = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX = "orders:cache:"
STATUS, DETAILS, CREDIT = "status", "order", "credit"

REQUESTS = Counter(
    "orders_cache_requests_total", "Cache lookups, by cache and result.", ["cache", "result"]
)
for _cache in (STATUS, DETAILS, CREDIT):
    for _result in ("hit", "miss", "error"):
        REQUESTS.labels(_cache, _result)

#: Write each value unless the key holds the same or a newer version.
#: KEYS: the keys; ARGV[1]: TTL in ms (0: none); then a (version, value) pair per key.
_PUT_NEWER = """
local ttl = tonumber(ARGV[1])
local written = 0
for i, key in ipairs(KEYS) do
  local version = tonumber(ARGV[2 * i])
  local current = redis.call('GET', key)
  local held = current and tonumber(string.match(current, '^(%d+)|'))
  if not held or held < version then
    local value = ARGV[2 * i] .. '|' .. ARGV[2 * i + 1]
    if ttl > 0 then
      redis.call('SET', key, value, 'PX', ttl)
    else
      redis.call('SET', key, value)
    end
    written = written + 1
  end
end
return written
"""


@dataclass(frozen=True)
class Entry:
    """A cached value and the version it was read at."""

    version: int
    value: dict[str, Any]


class Caches:
    """The three caches on one Redis database."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.05,
        status_ttl: float = 60.0,
        credit_ttl: float = 300.0,
        pause_after_failure: float = 1.0,
        sentinel: SentinelAccess | None = None,
    ) -> None:
        self.redis = connect(url, sentinel, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._put = self.redis.register_script(_PUT_NEWER)
        self.ttl_ms = {STATUS: int(status_ttl * 1000), DETAILS: 0, CREDIT: int(credit_ttl * 1000)}
        self.pause_after_failure = pause_after_failure
        self._down_until = 0.0

    def eviction_warning(self) -> str | None:
        """What is wrong with the cache's Redis for the details cache (keys without a
        TTL grow with every final order read), or None when it evicts by itself."""
        try:
            memory: Any = self.redis.info("memory")
        except RedisError as exc:
            return f"the cache's Redis cannot be asked its eviction policy: {exc!r}"
        policy = str(memory.get("maxmemory_policy", ""))
        if int(memory.get("maxmemory", 0)) > 0 and policy.startswith("allkeys-"):
            return None
        return (
            f"the cache's Redis evicts nothing (maxmemory {memory.get('maxmemory', 0)}, "
            f"policy {policy or 'unknown'}): cached order details have no TTL and will grow;"
            " give CACHE_URL a Redis with maxmemory and maxmemory-policy allkeys-lru"
        )

    # -- reads -------------------------------------------------------------------------

    def get(self, cache: str, ids: Sequence[object]) -> dict[str, Entry]:
        """The cached entries of these ids (one MGET), keyed by ``str(id)``; misses and
        a cache that cannot be reached leave ids out."""
        if not ids:
            return {}
        keys = [_key(cache, i) for i in ids]
        raw: Any = self._safely(lambda: self.redis.mget(keys), None)
        if raw is None:
            REQUESTS.labels(cache, "error").inc(len(ids))
            return {}
        found: dict[str, Entry] = {}
        for i, value in zip(ids, raw, strict=True):
            if value is not None:
                version, _, body = value.partition(b"|")
                found[str(i)] = Entry(int(version), json.loads(body))
        REQUESTS.labels(cache, "hit").inc(len(found))
        REQUESTS.labels(cache, "miss").inc(len(ids) - len(found))
        return found

    # -- writes ------------------------------------------------------------------------

    def put(self, cache: str, entries: Mapping[object, Entry]) -> None:
        """Write entries unless newer ones are there (one script call)."""
        if not entries:
            return
        keys = [_key(cache, i) for i in entries]
        argv: list[str | int] = [self.ttl_ms[cache]]
        for entry in entries.values():
            argv += [entry.version, json.dumps(entry.value, separators=(",", ":"))]
        self._safely(lambda: self._put(keys=keys, args=argv), None)

    def drop(self, cache: str, ids: Iterable[object]) -> None:
        """Remove entries (an event made them old)."""
        keys = [_key(cache, i) for i in ids]
        if keys:
            self._safely(lambda: self.redis.delete(*keys), None)

    def refresh(
        self,
        writes: Mapping[str, Mapping[object, Entry]],
        drops: Mapping[str, Iterable[object]],
    ) -> None:
        """Apply events' effects in one round trip: write newer entries, drop others.
        Unlike the reads' fills, errors are raised: the consumer applies the events
        again later."""
        with self.redis.pipeline(transaction=False) as pipe:
            for cache, entries in writes.items():
                if entries:
                    keys = [_key(cache, i) for i in entries]
                    argv: list[str | int] = [self.ttl_ms[cache]]
                    for entry in entries.values():
                        argv += [entry.version, json.dumps(entry.value, separators=(",", ":"))]
                    self._put(keys=keys, args=argv, client=pipe)
            for cache, ids in drops.items():
                keys = [_key(cache, i) for i in ids]
                if keys:
                    pipe.delete(*keys)
            pipe.execute()

    # -- a single flight per hot key ---------------------------------------------------

    def load_once(
        self,
        cache: str,
        item: object,
        load: Callable[[], T],
        cached: Callable[[Entry], T],
        wait: float = 0.05,
    ) -> T:
        """Load a missing value so that, of many requests missing the same key at once,
        one reads PostgreSQL (and fills the cache) while the others wait briefly for the
        cache; they read PostgreSQL themselves if it takes longer than ``wait``."""
        lock = f"{PREFIX}lock:{cache}:{item}"
        claimed: Any = self._safely(lambda: bool(self.redis.set(lock, b"1", nx=True, px=500)), True)
        if claimed:
            try:
                return load()
            finally:
                self._safely(lambda: self.redis.delete(lock), None)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(0.002)
            raw: Any = self._safely(lambda: self.redis.get(_key(cache, item)), None)
            if raw is not None:
                version, _, body = raw.partition(b"|")
                return cached(Entry(int(version), json.loads(body)))
        return load()

    def _safely(self, call: Callable[[], Any], default: Any) -> Any:
        if time.monotonic() < self._down_until:
            return default
        try:
            return call()
        except RedisError as exc:
            self._down_until = time.monotonic() + self.pause_after_failure
            logger.warning("cache unavailable, reading PostgreSQL: %r", exc)
            return default


def _key(cache: str, item: object) -> str:
    return f"{PREFIX}{cache}:{item}"


def order_key(order_id: UUID) -> str:
    """The status key of an order (for tests and operators)."""
    return _key(STATUS, order_id)
