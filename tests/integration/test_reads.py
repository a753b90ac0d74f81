"""The read side against real PostgreSQL and a real cache Redis: fixed query counts, the
caches kept fresh by the events, answers without the cache, and hit rates under skew."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from flask import Flask
from prometheus_client import REGISTRY
from sqlalchemy import Engine, event

from config.database import make_engine
from config.settings import Settings
from orders import events, keys, services
from orders.api import create_app
from orders.cache import CREDIT, DETAILS, STATUS, Caches, Entry
from orders.domain import OrderLine, PlaceOrder
from orders.projections import CacheRefresher
from orders.saga import RESERVE_CREDIT, RESERVE_STOCK, OrderSaga
from sagas import runner
from scripts.services import LocalRedis
from tests.conftest import API_KEY, Servers
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product, row_counts

AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Statements:
    """Counts the SQL statements an engine runs to read (not the API key's lookup, one
    per request whatever it reads)."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM api_keys" in statement:
            return
        with self._lock:
            self.count += 1

    @contextmanager
    def counting(self) -> Iterator[list[int]]:
        """Yields a list that holds, after the block, the statements run in it."""
        before, result = self.count, []
        yield result
        result.append(self.count - before)


@pytest.fixture(scope="module")
def reads_engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings, application_name="orders-reads-tests")
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def statements(reads_engine: Engine) -> Statements:
    return Statements(reads_engine)


@pytest.fixture(scope="module")
def cache_server(servers: Servers) -> Iterator[LocalRedis]:
    """A Redis of the caches' own, which a test may stop."""
    redis = LocalRedis(
        Path(servers.base), password="cache-tests", name="cache-redis", maxmemory="64mb"
    )
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture
def caches(cache_server: LocalRedis) -> Iterator[Caches]:
    if cache_server.process is None:
        cache_server.start()
    caches = Caches(cache_server.url(0), timeout=0.05)
    caches.redis.flushdb()
    yield caches


def make_app(settings: Settings, engine: Engine, caches: Caches | None) -> Flask:
    return create_app(settings, starter=RecordingLauncher(), engine=engine, caches=caches)


def place(engine: Engine, customer: str, product: str, quantity: int = 1) -> UUID:
    cmd = PlaceOrder(customer, (OrderLine(product, quantity),), client="tests")
    return services.place_order(engine, cmd, RecordingLauncher()).order_id


def cache_count(cache: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "orders_cache_requests_total", {"cache": cache, "result": result}
    )
    return value or 0.0


@pytest.fixture(scope="module")
def hundred(reads_engine: Engine) -> tuple[str, list[UUID]]:
    """A customer with 100 orders of two lines each."""
    customer = add_customer(reads_engine, limit="100000.00")
    first, second = add_product(reads_engine, on_hand=1000), add_product(reads_engine, on_hand=1000)
    placed = []
    for _ in range(100):
        cmd = PlaceOrder(customer, (OrderLine(first, 1), OrderLine(second, 2)), client="t")
        placed.append(services.place_order(reads_engine, cmd, RecordingLauncher()).order_id)
    return customer, placed


@pytest.mark.parametrize("cached", [False, True], ids=["no cache", "cold cache"])
def test_a_status_lookup_and_a_customer_page_issue_as_many_queries_for_1_as_for_100(
    settings: Settings,
    reads_engine: Engine,
    statements: Statements,
    hundred: tuple[str, list[UUID]],
    cache_server: LocalRedis,
    cached: bool,
) -> None:
    customer, placed = hundred
    caches = Caches(cache_server.url(1)) if cached else None
    client = make_app(settings, reads_engine, caches).test_client()
    counts: dict[str, list[int]] = {}
    for size in (1, 100):
        if caches is not None:
            caches.redis.flushdb()
        ids = ",".join(str(i) for i in placed[:size])
        with statements.counting() as status_queries:
            response = client.get(f"/orders/status?ids={ids}", headers=AUTH)
        assert response.status_code == 200
        assert len(response.json["statuses"]) == size and response.json["unknown"] == []
        with statements.counting() as page_queries:
            page = client.get(f"/customers/{customer}/orders?limit={size}", headers=AUTH)
        assert page.status_code == 200
        assert len(page.json["orders"]) == size
        assert all(len(order["lines"]) == 2 for order in page.json["orders"])
        counts[f"status x{size}"] = status_queries
        counts[f"page x{size}"] = page_queries
    print(f"\nstatements per request: {counts}")
    assert counts["status x1"] == counts["status x100"] == [1]
    assert counts["page x1"] == counts["page x100"] == [2]
    if caches is not None:  # warm: the statuses come from one MGET, no query
        with statements.counting() as warm:
            client.get(f"/orders/status?ids={','.join(map(str, placed))}", headers=AUTH)
        assert warm == [0]


def test_pages_of_a_customers_orders_are_newest_first_and_follow_each_other(
    settings: Settings, reads_engine: Engine, hundred: tuple[str, list[UUID]]
) -> None:
    customer, placed = hundred
    client = make_app(settings, reads_engine, None).test_client()
    seen: list[str] = []
    link: str | None = f"/customers/{customer}/orders?limit=30"
    while link:
        page = client.get(link, headers=AUTH).json
        seen += [order["order_id"] for order in page["orders"]]
        link = page["next"]
    assert seen == [str(order_id) for order_id in reversed(placed)]
    # A page that ends exactly at the last order links to no empty page after it.
    first = client.get(f"/customers/{customer}/orders?limit=50", headers=AUTH).json
    last = client.get(first["next"], headers=AUTH).json
    assert (len(last["orders"]), last["next"]) == (50, None)
    assert client.get(f"/customers/{customer}/orders?limit=100", headers=AUTH).json["next"] is None
    for nobody in ("nobody", "a%00b", "%20x", "x" * 65):
        for view in ("orders", "summary", "credit"):
            response = client.get(f"/customers/{nobody}/{view}", headers=AUTH)
            assert response.status_code == 404, (nobody, view)
            assert response.mimetype == "application/problem+json"
    for bad in ("limit=0", "limit=101", "limit=x", "after=garbage"):
        response = client.get(f"/customers/{customer}/orders?{bad}", headers=AUTH)
        assert response.status_code == 400, bad
        assert response.mimetype == "application/problem+json"
    for bad in ("", "ids=", "ids=not-a-uuid", "ids=" + ",".join(str(i) for i in placed) + ",x"):
        assert client.get(f"/orders/status?{bad}", headers=AUTH).status_code == 400, bad


def test_an_event_refreshes_the_cached_status_and_a_late_fill_cannot_bring_the_old_one_back(
    settings: Settings, reads_engine: Engine, caches: Caches, cache_server: LocalRedis
) -> None:
    customer, product = (
        add_customer(reads_engine, limit="100.00"),
        add_product(reads_engine, on_hand=5),
    )
    order_id = place(reads_engine, customer, product)
    client = make_app(settings, reads_engine, caches).test_client()
    status = f"/orders/{order_id}/status"
    assert client.get(status, headers=AUTH).json["status"] == "PENDING"
    pending = caches.get(STATUS, [order_id])[str(order_id)]  # cached, TTL 60 s
    assert 0 < caches.redis.pttl(f"orders:cache:status:{order_id}") <= 60_000

    with reads_engine.begin() as conn:
        services.cancel_order(conn, order_id, "out_of_stock")
    assert client.get(status, headers=AUTH).json["status"] == "PENDING"  # not applied yet
    # The consumer applies every event the session has written so far, in one batch:
    # give its Redis writes time on a loaded machine (in the system, a batch whose
    # writes time out is applied again).
    refresher = CacheRefresher(Caches(cache_server.url(0), timeout=10.0))
    events.consume(reads_engine, refresher, limit=1_000_000, hold=0)
    assert client.get(status, headers=AUTH).json["status"] == "CANCELLED"

    caches.put(STATUS, {order_id: pending})  # a reader that read PENDING before the event
    assert client.get(status, headers=AUTH).json["status"] == "CANCELLED"

    # A final order's details are cached without a TTL.
    detail = client.get(f"/orders/{order_id}", headers=AUTH).json
    assert detail["status"] == "CANCELLED"
    assert caches.redis.pttl(f"orders:cache:order:{order_id}") == -1


def test_a_status_cached_by_an_older_process_is_read_again_for_a_scoped_key(
    settings: Settings, reads_engine: Engine, owner_engine: Engine, caches: Caches
) -> None:
    customer, product = (
        add_customer(reads_engine, limit="100.00"),
        add_product(reads_engine, on_hand=5),
    )
    order_id = place(reads_engine, customer, product)
    with owner_engine.begin() as conn:
        scoped = {"Authorization": f"Bearer {keys.create(conn, 't', customer_ids=[customer])[1]}"}
    # A status as a process from before statuses named their customer cached it (a
    # rolling deploy): no customer_id, and a version no fill will overwrite.
    older = {
        "order_id": str(order_id),
        "status": "PENDING",
        "cancel_reason": None,
        "updated_at": datetime.now(UTC).isoformat(),
    }
    caches.put(STATUS, {order_id: Entry(10**6, older)})
    client = make_app(settings, reads_engine, caches).test_client()
    assert client.get(f"/orders/{order_id}/status", headers=scoped).status_code == 200
    listed = client.get(f"/orders/status?ids={order_id}", headers=scoped).json
    assert [s["order_id"] for s in listed["statuses"]] == [str(order_id)]


def test_credit_is_written_through_by_every_change_of_it(
    settings: Settings, reads_engine: Engine, caches: Caches
) -> None:
    customer = add_customer(reads_engine, limit="100.00")
    client = make_app(settings, reads_engine, caches).test_client()
    credit = f"/customers/{customer}/credit"
    assert client.get(credit, headers=AUTH).json["available"] == "100.00"
    assert 0 < caches.redis.pttl(f"orders:cache:credit:{customer}") <= 300_000

    def write_through(figures: Any) -> None:
        caches.put(CREDIT, {figures.customer_id: Entry(figures.version, _credit(figures))})

    saga = OrderSaga(on_credit=write_through)
    product = add_product(reads_engine, on_hand=5)

    def saga_of(quantity: int) -> tuple[UUID, dict[str, Any]]:
        cmd = PlaceOrder(customer, (OrderLine(product, quantity),), client="tests")
        accepted = services.place_order(reads_engine, cmd, RecordingLauncher())
        payload = {
            "order_id": str(accepted.order_id),
            "customer_id": customer,
            "amount": f"{10 * quantity}.00",
            "lines": [[product, quantity]],
        }
        return accepted.saga_id, payload

    def figures() -> tuple[str, str, str]:
        body = client.get(credit, headers=AUTH).json  # from the cache: no event applied
        return body["used"], body["reserved"], body["available"]

    confirmed, payload = saga_of(3)
    runner.run_step(reads_engine, saga, confirmed, RESERVE_CREDIT, payload)
    assert figures() == ("0.00", "30.00", "70.00")  # the reservation
    runner.run_step(reads_engine, saga, confirmed, RESERVE_STOCK, payload)
    runner.complete(reads_engine, saga, confirmed, retry_after=timedelta(seconds=1))
    assert figures() == ("30.00", "0.00", "70.00")  # the confirmation

    cancelled, payload = saga_of(6)  # 6 of 5 in stock: refused, the credit released
    runner.run_step(reads_engine, saga, cancelled, RESERVE_CREDIT, payload)
    assert figures() == ("30.00", "60.00", "10.00")
    runner.run_step(reads_engine, saga, cancelled, RESERVE_STOCK, payload)
    runner.complete(reads_engine, saga, cancelled, retry_after=timedelta(seconds=1))
    assert figures() == ("30.00", "0.00", "70.00")  # the release

    assert client.get("/customers/nobody/credit", headers=AUTH).status_code == 404


def _credit_of(customer: str) -> dict[str, str]:
    return {
        "customer_id": customer,
        "limit": "100.00",
        "used": "0.00",
        "reserved": "0.00",
        "available": "100.00",
    }


def _credit(figures: Any) -> dict[str, str]:
    return {
        "customer_id": figures.customer_id,
        "limit": str(figures.limit),
        "used": str(figures.used),
        "reserved": str(figures.reserved),
        "available": str(figures.available),
    }


def test_with_the_cache_redis_stopped_every_read_still_answers_correctly(
    settings: Settings, reads_engine: Engine, caches: Caches, cache_server: LocalRedis
) -> None:
    customer, product = (
        add_customer(reads_engine, limit="100.00"),
        add_product(reads_engine, on_hand=5),
    )
    order_id = place(reads_engine, customer, product, 2)
    with reads_engine.begin() as conn:
        services.cancel_order(conn, order_id, "out_of_stock")
    client = make_app(settings, reads_engine, caches).test_client()
    paths = [
        f"/orders/{order_id}",
        f"/orders/{order_id}/status",
        f"/orders/status?ids={order_id}",
        f"/customers/{customer}/orders",
        f"/customers/{customer}/summary",
        f"/customers/{customer}/credit",
    ]
    answers = {path: client.get(path, headers=AUTH) for path in paths}  # fills the caches
    assert all(r.status_code == 200 for r in answers.values())
    cache_server.stop()
    try:
        for path in paths:
            response = client.get(path, headers=AUTH)
            assert response.status_code == 200, path
            assert response.json == answers[path].json, path
        assert client.get(f"/orders/{order_id}/status", headers=AUTH).json["status"] == (
            "CANCELLED"
        )
    finally:
        cache_server.start()


def test_one_flight_to_postgresql_for_a_hot_missing_key(
    settings: Settings, reads_engine: Engine, statements: Statements, caches: Caches
) -> None:
    customer, product = (
        add_customer(reads_engine, limit="100.00"),
        add_product(reads_engine, on_hand=5),
    )
    order_id = place(reads_engine, customer, product)
    app = make_app(settings, reads_engine, caches)
    barrier = threading.Barrier(20)

    def read(_: int) -> str:
        with app.test_client() as client:
            barrier.wait()
            return str(client.get(f"/orders/{order_id}/status", headers=AUTH).json["status"])

    with statements.counting() as queries, ThreadPoolExecutor(20) as pool:
        results = list(pool.map(read, range(20)))
    print(f"\n20 concurrent misses of one key: {queries[0]} queries")
    assert results == ["PENDING"] * 20
    assert queries[0] <= 5


def test_hit_rates_under_a_skewed_read_load(
    settings: Settings, reads_engine: Engine, caches: Caches, hundred: tuple[str, list[UUID]]
) -> None:
    _, placed = hundred
    customers = [add_customer(reads_engine, limit="500.00") for _ in range(60)]
    client = make_app(settings, reads_engine, caches).test_client()
    rng = random.Random(7)
    hot_orders, cold_orders = placed[:5], placed[5:]
    hot_customers, cold_customers = customers[:5], customers[5:]
    before = {c: (cache_count(c, "hit"), cache_count(c, "miss")) for c in (STATUS, CREDIT)}
    for _ in range(1000):
        order_id = rng.choice(hot_orders if rng.random() < 0.9 else cold_orders)
        assert client.get(f"/orders/{order_id}/status", headers=AUTH).status_code == 200
        customer = rng.choice(hot_customers if rng.random() < 0.95 else cold_customers)
        assert client.get(f"/customers/{customer}/credit", headers=AUTH).status_code == 200
    rates = {}
    for cache, (hits, misses) in before.items():
        hit, miss = cache_count(cache, "hit") - hits, cache_count(cache, "miss") - misses
        rates[cache] = hit / (hit + miss)
    print(f"\nhit rates under skew: status {rates[STATUS]:.1%}, credit {rates[CREDIT]:.1%}")
    assert rates[STATUS] >= 0.80
    assert rates[CREDIT] >= 0.90


def test_the_credit_precheck_refuses_what_credit_cannot_cover_and_never_on_a_stale_cache(
    settings: Settings, reads_engine: Engine, caches: Caches
) -> None:
    customer = add_customer(reads_engine, limit="100.00")
    product = add_product(reads_engine, on_hand=50, price="10.00")
    client = make_app(replace(settings, credit_precheck=True), reads_engine, caches).test_client()

    def order(quantity: int) -> Any:
        body = {"customer_id": customer, "lines": [{"product_id": product, "quantity": quantity}]}
        return client.post("/orders", json=body, headers=AUTH)

    before = row_counts(reads_engine)
    refused = order(11)  # 110.00 of 100.00
    assert refused.status_code == 422 and refused.mimetype == "application/problem+json"
    assert refused.json["title"] == "Credit limit exceeded"
    assert "available 100.00" in str(refused.json["errors"])
    assert row_counts(reads_engine) == before

    # A cache that says too little (stale) does not refuse: PostgreSQL has the last word.
    stale = Entry(10**9, {**_credit_of(customer), "available": "0.00", "used": "100.00"})
    caches.put(CREDIT, {customer: stale})
    assert order(5).status_code == 202

    # The check reads PostgreSQL in the order's own transaction: an API whose pool has
    # one connection still answers (a second connection would wait, then fail).
    one = replace(settings, db_pool=replace(settings.db_pool, pool_size=1, max_overflow=0))
    narrow = make_engine(one, application_name="orders-reads-tests-narrow")
    try:
        single = make_app(replace(one, credit_precheck=True), narrow, caches).test_client()
        caches.redis.delete(f"orders:cache:credit:{customer}")
        body = {"customer_id": customer, "lines": [{"product_id": product, "quantity": 11}]}
        refused = single.post("/orders", json=body, headers=AUTH)  # 110.00 of 100.00
        assert refused.status_code == 422, refused.json
        assert "available 100.00" in str(refused.json["errors"])
    finally:
        narrow.dispose()


def test_the_details_cache_stays_within_its_redis_memory_and_a_broker_redis_is_reported(
    servers: Servers, caches: Caches
) -> None:
    """Final orders' details have no TTL: the caches' own Redis (as ``make run`` and
    docker-compose.yml start it) evicts the least recently used; the broker's would not."""
    assert caches.eviction_warning() is None
    broker = Caches(servers.redis.url(0))
    warning = broker.eviction_warning()
    assert warning is not None and "allkeys-lru" in warning
    broker.redis.close()

    small = LocalRedis(Path(servers.base), password="small", name="small-cache", maxmemory="2mb")
    small.start()
    try:
        # A generous timeout: a put of 500 entries on a loaded machine may take longer
        # than the caches' 50 ms, which would turn the cache off for a second (a miss).
        cache = Caches(small.url(0), timeout=5.0)
        line = {"product_id": "SKU-1", "quantity": 1, "unit_price": "10.00"}
        for batch in range(40):  # about 8 MB of details, four times the limit
            cache.put(
                DETAILS,
                {f"{batch}-{i}": Entry(1, {"lines": [line] * 4}) for i in range(500)},
            )
        memory = cache.redis.info("memory")
        assert memory["used_memory"] <= 3 * 1024 * 1024  # the limit and Redis's own
        # Still serving what was written last. Redis's LRU is approximate (it evicts the
        # oldest of a few sampled keys, on a clock of one-second ticks, and all of this
        # takes less than a second), so keys of the newest batch go too: most stay.
        newest = [f"39-{i}" for i in range(500)]
        found = cache.get(DETAILS, newest)
        assert len(found) >= 250, len(found)
        assert all(entry.value["lines"] == [line] * 4 for entry in found.values())
        cache.redis.close()
    finally:
        small.stop()
