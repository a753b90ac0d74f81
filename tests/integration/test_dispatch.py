"""Publishing sagas to a real Redis: the chord's messages, the API's fast path with its
outbox fallback, and the relay (no worker consumes this broker database)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from redis import Redis
from sqlalchemy import Engine, select, update

from config import names
from config.settings import Settings
from orders import services
from orders.domain import OrderLine, PlaceOrder
from orders.saga import DEFINITIONS, ORDER_SAGA
from sagas.launch import ChordLauncher, relay_outbox
from sagas.tables import outbox, sagas
from scripts.services import free_port
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product, wait_for
from workers.celery_app import create_celery


@pytest.fixture
def broker_settings(settings: Settings, servers) -> Settings:  # type: ignore[no-untyped-def]
    return replace(
        settings, broker_url=servers.redis.url(2), result_backend_url=servers.redis.url(3)
    )


@pytest.fixture
def redis(broker_settings: Settings) -> Iterator[Redis]:
    client = Redis.from_url(broker_settings.broker_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def publisher(broker_settings: Settings, redis: Redis) -> Celery:
    return create_celery(broker_settings, publisher=True)


def queued(redis: Redis, queue: str) -> list[dict[str, Any]]:
    """The messages waiting in a queue, oldest first, decoded."""
    messages = []
    for raw in reversed(redis.lrange(queue, 0, -1)):
        message = json.loads(raw)
        args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
        messages.append({"headers": message["headers"], "args": args, "embed": embed})
    return messages


def place(engine: Engine, starter: Any) -> Any:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    cmd = PlaceOrder(customer, (OrderLine(product, 1),), client="tests")
    return services.place_order(engine, cmd, starter)


def outbox_has(engine: Engine, saga_id: Any) -> bool:
    with engine.connect() as conn:
        return (
            conn.execute(select(outbox.c.saga_id).where(outbox.c.saga_id == saga_id)).first()
            is not None
        )


def test_a_saga_is_one_chord_whose_steps_run_in_parallel_on_the_saga_lane(
    engine: Engine, publisher: Celery, redis: Redis
) -> None:
    launcher = ChordLauncher(engine, publisher, ORDER_SAGA, timedelta(seconds=30))
    accepted = place(engine, launcher)

    messages = queued(redis, names.SAGA_QUEUE)
    assert [m["headers"]["task"] for m in messages] == [names.RESERVE_STOCK, names.RESERVE_CREDIT]
    saga_id = str(accepted.saga_id)
    for index, message in enumerate(messages):
        headers = message["headers"]
        assert headers["group"] == saga_id and headers["group_index"] == index
        assert headers["id"] == f"{saga_id}.{ORDER_SAGA.steps[index].name}"
        assert headers["ignore_result"] is True
        assert message["args"][0] == saga_id
        body = message["embed"]["chord"]
        assert (body["task"], body["args"]) == (names.COMPLETE_ORDER, [saga_id])
        assert body["options"]["task_id"] == f"{saga_id}.complete"
    # The API's fast path clears the outbox entry (in its next batch) and holds no
    # result subscription.
    wait_for(
        "the outbox entry to be cleared",
        lambda: not outbox_has(engine, accepted.saga_id),
        timeout=5,
    )
    assert not publisher.backend.result_consumer.subscribed_to


def test_publishing_many_sagas_leaves_no_subscription_behind(
    engine: Engine, publisher: Celery, redis: Redis
) -> None:
    launcher = ChordLauncher(engine, publisher, ORDER_SAGA, timedelta(seconds=30))
    for _ in range(50):
        place(engine, launcher)
    assert redis.llen(names.SAGA_QUEUE) == 100
    assert not publisher.backend.result_consumer.subscribed_to


def test_an_order_is_accepted_when_the_broker_is_down_and_left_to_the_relay(
    engine: Engine, broker_settings: Settings
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = create_celery(
        replace(broker_settings, broker_url=dead, result_backend_url=dead), publisher=True
    )
    launcher = ChordLauncher(engine, down, ORDER_SAGA, timedelta(seconds=30))
    started = time.monotonic()
    accepted = place(engine, launcher)
    assert time.monotonic() - started < 3 * broker_settings.dispatch_timeout_seconds + 1
    assert outbox_has(engine, accepted.saga_id)


def test_the_relay_dispatches_what_the_fast_path_did_not(
    engine: Engine, publisher: Celery, redis: Redis
) -> None:
    # What earlier tests left for the relay goes first, so that only this test's count.
    relay_outbox(engine, publisher, DEFINITIONS, grace=timedelta(0))
    redis.flushdb()
    recording = RecordingLauncher()  # stages like the API, never publishes
    stale, fresh, finished = (place(engine, recording) for _ in range(3))
    long_ago = datetime.now(UTC) - timedelta(minutes=1)
    with engine.begin() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.saga_id.in_([stale.saga_id, finished.saga_id]))
            .values(created_at=long_ago)
        )
        conn.execute(
            update(sagas)
            .where(sagas.c.id == finished.saga_id)
            .values(state="CONFIRMED", finished_at=long_ago)
        )

    assert relay_outbox(engine, publisher, DEFINITIONS, grace=timedelta(seconds=2)) == 1
    groups = {m["headers"]["group"] for m in queued(redis, names.SAGA_QUEUE)}
    assert groups == {str(stale.saga_id)}
    assert not outbox_has(engine, stale.saga_id)
    assert not outbox_has(engine, finished.saga_id)  # dropped, not dispatched
    assert outbox_has(engine, fresh.saga_id)  # still the fast path's, for now
    assert relay_outbox(engine, publisher, DEFINITIONS, grace=timedelta(seconds=2)) == 0


def test_an_entry_whose_relay_could_not_publish_comes_due_again_after_its_lease(
    engine: Engine, publisher: Celery, redis: Redis, broker_settings: Settings
) -> None:
    relay_outbox(engine, publisher, DEFINITIONS, grace=timedelta(0))
    accepted = place(engine, RecordingLauncher())
    down = create_celery(
        replace(broker_settings, broker_url=f"redis://127.0.0.1:{free_port()}/0"), publisher=True
    )
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever the broker's client raises
            relay_outbox(engine, down, DEFINITIONS, grace=timedelta(0))
    finally:
        down.close()
    # The claim committed before the publish: the entry waits for its lease.
    assert outbox_has(engine, accepted.saga_id)
    assert relay_outbox(engine, publisher, DEFINITIONS, grace=timedelta(0)) == 0
    with engine.begin() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.saga_id == accepted.saga_id)
            .values(created_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert relay_outbox(engine, publisher, DEFINITIONS, grace=timedelta(0)) == 1
    assert not outbox_has(engine, accepted.saga_id)
