"""Operations through the real processes: retries and the dead-letter queue, messages
that cannot be run, the batch credit check, two beats, and interactive sagas beside a
deep batch backlog (each lane served by its own worker, as the Procfile runs them)."""

from __future__ import annotations

import itertools
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from kombu import Connection
from redis import Redis
from sqlalchemy import Engine, func, insert, select, text, update

from config import names
from config.settings import Settings
from orders.tables import credit_reviews, customers
from tests.conftest import ADMIN_KEY, Servers
from tests.harness.client import Api
from tests.harness.processes import Service, Stack, WorkerSpec
from tests.helpers import add_customer, add_product, wait_for
from workers.celery_app import create_celery
from workers.tables import batch_runs, dead_letters

pytestmark = pytest.mark.e2e

ADMIN = ADMIN_KEY
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
#: The ops stack's retry backoff: retry n waits between half and all of
#: min(BACKOFF_MAX, BACKOFF * 2**n) (``workers.base.retry_delay``).
BACKOFF, BACKOFF_MAX = 0.25, 2.0
LANES = [
    WorkerSpec("saga", "saga.high", concurrency=2),
    WorkerSpec("default", "default", concurrency=1),
    WorkerSpec("batch", "batch.low", concurrency=1, nice=10),
]


@pytest.fixture(scope="module")
def ops(settings: Settings, servers: Servers) -> Iterator[tuple[Stack, Celery]]:
    own = replace(
        settings, broker_url=servers.redis.url(30), result_backend_url=servers.redis.url(31)
    )
    stack = Stack(
        own,
        servers.base / "e2e-ops",
        worker_specs=LANES,
        beat=False,
        extra_env={
            "TEST_TASKS": "1",
            "TASK_MAX_RETRIES": "5",  # above Celery's own default of 3
            "RETRY_BACKOFF_SECONDS": str(BACKOFF),
            "RETRY_BACKOFF_MAX_SECONDS": str(BACKOFF_MAX),
            "FAILPOINTS": "credit_check.chunk@3=raise",
            # Read by the workers too: a run's window comes from the same schedule as beat's.
            "CREDIT_CHECK_EVERY_SECONDS": "4",
            "LOG_LEVEL": "WARNING",
        },
    )
    publisher = create_celery(own, publisher=True)
    try:
        stack.start()
        yield stack, publisher
    finally:
        stack.stop()


def letters(api_url: str, **params: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{api_url}/admin/dead-letters", params=params, headers=ADMIN_HEADERS)
    response.raise_for_status()
    return list(response.json()["dead_letters"])


def test_a_failing_task_retries_with_growing_delays_then_is_dead_lettered_and_replayed(
    ops: tuple[Stack, Celery],
) -> None:
    stack, publisher = ops
    redis = Redis.from_url(stack.settings.broker_url)
    key = uuid.uuid4().hex[:8]
    redis.set(f"testing:{key}:broken", "1")
    publisher.send_task(names.TEST_FLAKY, args=(key,))

    (letter,) = wait_for(
        "the dead letter",
        lambda: [x for x in letters(stack.api_url, task=names.TEST_FLAKY) if x["args"] == [key]],
        30,
    )
    assert (letter["kind"], letter["attempts"]) == ("exhausted", 6)
    assert f"testing: {key} is broken" in letter["error"]
    times = [float(t) for t in redis.lrange(f"testing:{key}:attempts", 0, -1)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Growing delays: each wait at least its step's floor (0.125, 0.25, 0.5, 1, 1 s). Two
    # neighbours may meet at a boundary (one's ceiling is the next one's floor), so the
    # gaps themselves need not be in order; the floors are what a constant backoff misses.
    floors = [min(BACKOFF_MAX, BACKOFF * 2**n) / 2 for n in range(len(gaps))]
    assert len(times) == 6, times
    assert all(gap >= floor for gap, floor in zip(gaps, floors, strict=True)), gaps

    redis.delete(f"testing:{key}:broken")  # the cause is fixed
    replayed = httpx.post(
        f"{stack.api_url}/admin/dead-letters/{letter['id']}/replay", headers=ADMIN_HEADERS
    )
    assert replayed.status_code == 202
    wait_for("the replay to succeed", lambda: redis.get(f"testing:{key}:done"), 20)
    done = [
        x
        for x in letters(stack.api_url, task=names.TEST_FLAKY, state="replayed")
        if x["id"] == letter["id"]
    ]
    assert done and done[0]["replayed_task_id"]


def test_an_undecodable_message_and_an_unknown_task_end_as_dead_letters(
    ops: tuple[Stack, Celery], engine: Engine
) -> None:
    stack, publisher = ops
    marker = uuid.uuid4().hex[:8]
    with Connection(stack.settings.broker_url) as conn:
        conn.Producer().publish(  # a body that does not decode as JSON
            b"{not json " + marker.encode(),
            routing_key="default",
            exchange="",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"id": f"bad-{marker}", "task": names.TEST_BATCH_NOOP},
        )
    publisher.send_task(
        "no.such.task",
        args=[marker],
        task_id=f"unknown-{marker}",
        queue=stack.settings.default_queue,
    )

    def kept() -> dict[str, Any] | None:
        with engine.connect() as conn:
            rows = conn.execute(
                select(dead_letters.c.task_id, dead_letters.c.kind).where(
                    dead_letters.c.task_id.in_([f"bad-{marker}", f"unknown-{marker}"])
                )
            ).all()
        return dict(rows) if len(rows) == 2 else None

    assert wait_for("both dead letters", kept, 20) == {
        f"bad-{marker}": "undecodable",
        f"unknown-{marker}": "unknown_task",
    }
    api = stack.client()  # the workers carry on
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    order = api.place(customer, [(product, 1)]).json()["order_id"]
    assert api.wait_until_final(order)["status"] == "CONFIRMED"


def test_a_credit_check_over_a_thousand_customers_finishes_with_a_failed_chunk(
    ops: tuple[Stack, Celery], engine: Engine
) -> None:
    stack, _ = ops
    tag = uuid.uuid4().hex[:6]
    clean = [f"BATCH-{tag}-{n:04d}" for n in range(1000)]
    over = [f"BATCH-{tag}-OVER-{n}" for n in range(3)]
    with engine.begin() as conn:
        conn.execute(
            insert(customers), [{"id": c, "name": c, "credit_limit": 100} for c in clean + over]
        )
        conn.execute(
            update(customers)
            .where(customers.c.id.in_(over))
            .values(credit_used=Decimal("90.00"), credit_limit=Decimal("50.00"))
        )
        total = conn.execute(select(func.count()).select_from(customers)).scalar_one()

    started = httpx.post(f"{stack.api_url}/admin/batches/credit-check", headers=ADMIN_HEADERS)
    assert started.status_code == 202
    run = wait_for(
        "the run to finish",
        lambda: (
            (
                r := httpx.get(
                    f"{stack.api_url}{started.headers['Location']}", headers=ADMIN_HEADERS
                ).json()
            )["state"]
            == "FINISHED"
            and r
        ),
        90,
    )
    assert run["total"] == total
    assert (run["chunks_failed"], run["failed"]) == (1, 100)  # chunk 3, forced to fail
    assert run["processed"] + run["failed"] == total and run["progress"] == 100.0
    failed = [
        x
        for x in letters(stack.api_url, task=names.CREDIT_CHECK_CHUNK)
        if x["args"][0] == run["id"]
    ]
    assert len(failed) == 1 and failed[0]["args"][1] == 3
    with engine.connect() as conn:
        flagged = dict(
            conn.execute(
                select(credit_reviews.c.customer_id, credit_reviews.c.over_limit).where(
                    credit_reviews.c.customer_id.in_(clean + over)
                )
            ).all()
        )
    reviewed_clean = [c for c in clean if c in flagged]
    assert reviewed_clean and not any(flagged[c] for c in reviewed_clean)
    assert all(flagged.get(c) for c in over if c in flagged)
    assert len(flagged) == len(clean) + len(over) - sum(
        1 for c in clean + over if c in failed[0]["args"][2]
    )


def test_two_beats_start_one_run_per_tick(ops: tuple[Stack, Celery], engine: Engine) -> None:
    stack, _ = ops
    celery = str(Path(sys.executable).parent / "celery")
    env = {**stack.services[0].env, "LOG_LEVEL": "INFO"}  # the stack's schedule
    since = time.time()
    beats = [
        Service(
            f"beat-{n}",
            [
                celery,
                "-A",
                "workers.app",
                "beat",
                # Each with a schedule of its own and no lock: even then, one run a tick.
                "-S",
                "celery.beat:PersistentScheduler",
                "-s",
                str(stack.log_dir / f"beats-{n}"),
                "-l",
                "INFO",
            ],
            {**env, "PROMETHEUS_MULTIPROC_DIR": str(stack.log_dir / f"beat-metrics-{n}")},
            stack.log_dir,
        )
        for n in (1, 2)
    ]

    def sends() -> list[int]:
        return [b.log().count("Sending due task credit-check") for b in beats]

    try:
        for beat in beats:
            beat.start()
        try:
            wait_for("three ticks of both beats", lambda: min(sends()) >= 3, 40)
        except AssertionError as exc:
            logs = "\n".join(b.log()[-2000:] for b in beats)
            raise AssertionError(f"{exc}\n{logs}") from None
    finally:
        for beat in beats:
            beat.stop()
    sent = sends()
    wait_for("the runs to be recorded", lambda: _scheduled_runs(engine, since) >= max(sent), 20)
    # Both beats sent every tick; each tick made one run.
    assert _scheduled_runs(engine, since) == max(sent)


def _scheduled_runs(engine: Engine, since: float) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(batch_runs)
                .where(batch_runs.c.window_key.not_like("manual-%"))
                .where(batch_runs.c.started_at >= func.to_timestamp(since))
            ).scalar_one()
        )


def saga_p95(api: Api, engine: Engine, count: int, rate: float) -> float:
    customer = add_customer(engine, limit="100000.00")
    product = add_product(engine, on_hand=100000, price="1.00")
    ids: list[str] = []

    def place(n: int) -> None:
        time.sleep(n / rate)
        ids.append(str(api.place(customer, [(product, 1)]).json()["order_id"]))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(place, range(count)))
    for order_id in ids:
        api.wait_until_final(order_id, timeout=60)
    with engine.connect() as conn:
        took = (
            conn.execute(
                text(
                    "SELECT extract(epoch FROM s.finished_at - s.created_at) FROM sagas s "
                    "JOIN orders o ON o.saga_id = s.id WHERE o.id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": ids},
            )
            .scalars()
            .all()
        )
    return statistics.quantiles([float(t) for t in took], n=20)[18]


def test_interactive_sagas_keep_their_pace_beside_twenty_thousand_batch_tasks(
    ops: tuple[Stack, Celery], engine: Engine
) -> None:
    stack, publisher = ops
    api = stack.client()
    idle = saga_p95(api, engine, count=120, rate=20)

    with publisher.producer_or_acquire() as producer:
        for _ in range(20_000):
            publisher.send_task(names.TEST_BATCH_NOOP, producer=producer)
    redis = Redis.from_url(stack.settings.broker_url)
    backlog = redis.llen(stack.settings.batch_queue)
    loaded = saga_p95(api, engine, count=120, rate=20)
    still_queued = redis.llen(stack.settings.batch_queue)

    print(
        f"\nsaga p95: idle {idle * 1000:.1f} ms, beside the batch backlog "
        f"{loaded * 1000:.1f} ms ({loaded / idle:.2f}x); batch queue {backlog} -> "
        f"{still_queued} while measured"
    )
    assert backlog >= 15_000 and still_queued > 0  # the backlog was there throughout
    assert loaded <= 3 * idle
    redis.delete(stack.settings.batch_queue)
