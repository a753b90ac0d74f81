"""No message can stop a worker: whatever lies on a lane's Redis list (bytes that are not
JSON, JSON that is not a kombu envelope, an envelope whose body or headers are not a
task message, a refused serializer, an unknown task, a body over the size limit,
arguments a task cannot take) becomes a dead letter of its kind, with the item's bytes,
and the worker that read it goes on with the next message. Each item is pushed straight
onto the list, as a broken or hostile producer would."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from celery import Celery
from redis import Redis
from sqlalchemy import Engine, or_, select

from config import names
from config.settings import Settings
from sagas.registry import SagaRegistry
from tests.conftest import Servers
from tests.harness.processes import Service, Stack, WorkerSpec
from tests.helpers import add_customer, add_product, wait_for
from workers import dlq
from workers.celery_app import create_celery
from workers.tables import dead_letters

pytestmark = pytest.mark.e2e

#: The size limit the workers run with here (small, so a body over it stays small).
MAX_MESSAGE_BYTES = 64 * 1024
LANES = [
    WorkerSpec("saga", "saga.high", concurrency=2),
    WorkerSpec("default", "default", concurrency=1),
    WorkerSpec("batch", "batch.low", concurrency=1, nice=10),
]
QUEUE = {"saga": "saga.high", "default": "default", "batch": "batch.low"}


@dataclass
class Poisoned:
    """The stack under test, a publisher, a broker client and the workers' pids."""

    stack: Stack
    publisher: Celery
    redis: Redis
    pids: dict[str, int]


@pytest.fixture(scope="module")
def lanes(settings: Settings, servers: Servers) -> Iterator[Stack]:
    """A worker per lane (as the Procfile runs them) and the API."""
    own = replace(
        settings, broker_url=servers.redis.url(40), result_backend_url=servers.redis.url(41)
    )
    stack = Stack(
        own,
        servers.base / "e2e-poison",
        worker_specs=LANES,
        extra_env={"TEST_TASKS": "1", "MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def poisoned(lanes: Stack) -> Iterator[Poisoned]:
    publisher = create_celery(lanes.settings, publisher=True)
    pids = {spec.name: pid_of(lanes.service(spec.name)) for spec in LANES}
    try:
        yield Poisoned(lanes, publisher, Redis.from_url(lanes.settings.broker_url), pids)
    finally:
        publisher.close()


def pid_of(service: Service) -> int:
    assert service.process is not None
    return service.process.pid


# -- items as they would lie on a lane's list --------------------------------------


def envelope(
    queue: str,
    body: bytes,
    *,
    task: str | None,
    task_id: str,
    content_type: str = "application/json",
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
) -> bytes:
    """A kombu message as the Redis transport writes it (see a real send_task's LRANGE)."""
    header_fields: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "",
        "kwargsrepr": "{}",
        "origin": "test_poison_messages",
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        **(headers or {}),
    }
    item = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8" if content_type == "application/json" else "binary",
        "content-type": content_type,
        "headers": header_fields,
        "properties": {
            "correlation_id": task_id,
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            **(properties or {}),
        },
    }
    return json.dumps(item).encode()


def task_body(args: Any, kwargs: Any = None, embed: Any = None, *extra: Any) -> bytes:
    """A protocol 2 body: [args, kwargs, embed], plus whatever else a case adds."""
    embed = embed if embed is not None else {"callbacks": None, "errbacks": None}
    return json.dumps([args, kwargs if kwargs is not None else {}, embed, *extra]).encode()


def saga_step(marker: str, args: Any, **options: Any) -> bytes:
    return envelope(
        QUEUE["saga"], task_body(args), task=names.RESERVE_STOCK, task_id=marker, **options
    )


@dataclass(frozen=True)
class Case:
    """One kind of poison: the lane it is pushed on, the item, the letter it becomes."""

    name: str
    lane: str
    kind: str
    item: Callable[[str], bytes]


def a_saga() -> str:
    return str(uuid.uuid4())


CASES = [
    Case(
        "bytes that are not JSON",
        "saga",
        "undecodable",
        lambda m: b"\xff\xfe\x00{not json at all " + m.encode(),
    ),
    Case(
        "a JSON object that is not an envelope",
        "default",
        "not_an_envelope",
        lambda m: json.dumps({"hello": m}).encode(),
    ),
    Case(
        "a JSON list that is not an envelope",
        "batch",
        "not_an_envelope",
        lambda m: json.dumps([m, 1, 2]).encode(),
    ),
    Case(
        "an envelope without a delivery tag",
        "saga",
        "not_an_envelope",
        lambda m: saga_step(m, [a_saga(), {}], properties={"delivery_tag": None}),
    ),
    Case(
        "an envelope whose body is not base64",
        "default",
        "undecodable",
        lambda m: envelope(QUEUE["default"], b"", task=names.RELAY_OUTBOX, task_id=m).replace(
            b'"body": ""', b'"body": "%%% not base64 %%%"'
        ),
    ),
    Case(
        "a body that is not JSON",
        "default",
        "undecodable",
        lambda m: envelope(QUEUE["default"], b"{not json", task=names.RELAY_OUTBOX, task_id=m),
    ),
    Case(
        "a body of four values",
        "saga",
        "malformed_body",
        lambda m: envelope(
            QUEUE["saga"],
            task_body([a_saga(), {}], {}, {}, "one too many"),
            task=names.RESERVE_STOCK,
            task_id=m,
        ),
    ),
    Case(
        "a body that is a number",
        "default",
        "malformed_body",
        lambda m: envelope(QUEUE["default"], b"42", task=names.RELAY_OUTBOX, task_id=m),
    ),
    Case(
        "a body whose embed is not an object",
        "batch",
        "malformed_body",
        lambda m: envelope(
            QUEUE["batch"], task_body([], {}, "nope"), task=names.TEST_BATCH_NOOP, task_id=m
        ),
    ),
    Case(
        "headers without a task id",
        "saga",
        "malformed_headers",
        lambda m: saga_step(m, [a_saga(), {}], headers={"id": None, "argsrepr": m}),
    ),
    Case(
        "a time limit that is not two numbers",
        "default",
        "malformed_headers",
        lambda m: envelope(
            QUEUE["default"],
            task_body([]),
            task=names.RELAY_OUTBOX,
            task_id=m,
            headers={"timelimit": "soon"},
        ),
    ),
    Case(
        "an ETA that is not a time",  # refused by Celery itself (on_invalid_task)
        "batch",
        "malformed_headers",
        lambda m: envelope(
            QUEUE["batch"],
            task_body([]),
            task=names.TEST_BATCH_NOOP,
            task_id=m,
            headers={"eta": "the day after tomorrow"},
        ),
    ),
    Case(
        "a pickled body",
        "default",
        "refused_content_type",
        lambda m: envelope(
            QUEUE["default"],
            b"\x80\x04K\x01.",
            task=names.RELAY_OUTBOX,
            task_id=m,
            content_type="application/x-python-serialize",
        ),
    ),
    Case(
        "a YAML body",
        "batch",
        "refused_content_type",
        lambda m: envelope(
            QUEUE["batch"],
            b"- []\n- {}\n- {}\n",
            task=names.TEST_BATCH_NOOP,
            task_id=m,
            content_type="application/x-yaml",
        ),
    ),
    Case(
        "a msgpack body",
        "saga",
        "refused_content_type",
        lambda m: envelope(
            QUEUE["saga"],
            b"\x93\x90\x80\x80",
            task=names.RESERVE_STOCK,
            task_id=m,
            content_type="application/x-msgpack",
        ),
    ),
    Case(
        "a task no worker has",
        "batch",
        "unknown_task",
        lambda m: envelope(QUEUE["batch"], task_body([m]), task="no.such.task", task_id=m),
    ),
    Case(
        "a body over the size limit",
        "saga",
        "too_large",
        lambda m: saga_step(m, [a_saga(), {"filler": "x" * MAX_MESSAGE_BYTES}]),
    ),
    Case(
        "a saga step whose saga id is not a UUID",
        "saga",
        "bad_arguments",
        lambda m: saga_step(m, ["not-a-uuid", {"order_id": m}]),
    ),
    Case(
        "a chunk missing an argument",
        "batch",
        "bad_arguments",
        lambda m: envelope(
            QUEUE["batch"],
            task_body([str(uuid.uuid4()), 1]),
            task=names.CREDIT_CHECK_CHUNK,
            task_id=m,
        ),
    ),
    Case(
        "a chunk whose number is a string",
        "batch",
        "bad_arguments",
        lambda m: envelope(
            QUEUE["batch"],
            task_body([str(uuid.uuid4()), "three", []]),
            task=names.CREDIT_CHECK_CHUNK,
            task_id=m,
        ),
    ),
    Case(
        "a relay given an argument",
        "default",
        "bad_arguments",
        lambda m: envelope(QUEUE["default"], task_body([1]), task=names.RELAY_OUTBOX, task_id=m),
    ),
]


# -- what is checked after each item -----------------------------------------------


def letter_of(engine: Engine, marker: str) -> Any:
    """The dead letter of the item carrying ``marker`` (as its task id, or in its bytes)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(dead_letters).where(
                or_(dead_letters.c.task_id == marker, dead_letters.c.raw.contains(marker))
            )
        ).all()
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


def assert_the_lane_goes_on(poisoned: Poisoned, engine: Engine, lane: str) -> None:
    """The lane's worker has the pid it started with, takes the next message (an order's
    steps, a task of its lane), and nothing of the poison is left in Redis."""
    stack, redis = poisoned.stack, poisoned.redis
    for name, pid in poisoned.pids.items():
        service = stack.service(name)
        assert service.process is not None and service.process.poll() is None, service.log()
        assert pid_of(service) == pid, f"the {name} worker was restarted"

    api = stack.client()
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    order = api.place(customer, [(product, 1)]).json()["order_id"]
    assert api.wait_until_final(order)["status"] == "CONFIRMED"
    if lane == "default":
        key = uuid.uuid4().hex
        poisoned.publisher.send_task(names.TEST_FLAKY, args=[key])
        wait_for("the default lane's next task", lambda: redis.get(f"testing:{key}:done"), 30)
    elif lane == "batch":
        task_id = f"probe-{uuid.uuid4().hex}"
        poisoned.publisher.send_task(names.TEST_BATCH_NOOP, task_id=task_id)
        stack.service("batch").wait_for_log(rf"{names.TEST_BATCH_NOOP}\[{task_id}\] succeeded", 30)
    wait_for(
        "the lanes and the unacknowledged set to be empty",
        lambda: not any(redis.llen(q) for q in QUEUE.values()) and not redis.hlen("unacked"),
        30,
    )


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_poison_item_becomes_a_dead_letter_and_its_worker_goes_on(
    poisoned: Poisoned, engine: Engine, case: Case
) -> None:
    marker = f"poison-{uuid.uuid4().hex}"
    item = case.item(marker)
    poisoned.redis.lpush(QUEUE[case.lane], item)

    letter = wait_for(f"the dead letter of {case.name}", lambda: letter_of(engine, marker), 30)
    assert (letter.kind, letter.state) == (case.kind, "OPEN"), letter.error
    assert letter.queue == QUEUE[case.lane]
    assert (
        letter.raw
        == item.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")[: dlq.KEEP_CHARS]
    )
    assert letter.error
    if case.kind in ("unknown_task", "bad_arguments"):  # a task message: its args shown
        assert letter.args == json.loads(base64.b64decode(json.loads(item)["body"]))[0]
    assert_the_lane_goes_on(poisoned, engine, case.lane)


def test_a_worker_started_with_a_poison_message_queued_starts_stays_up_and_dead_letters_it(
    poisoned: Poisoned, engine: Engine
) -> None:
    stack, redis = poisoned.stack, poisoned.redis
    worker = stack.service("default")
    worker.stop()
    marker = f"poison-{uuid.uuid4().hex}"
    # The poison that stopped a worker at every start: a body of four values.
    item = envelope(
        QUEUE["default"],
        task_body([], {}, {}, "one too many"),
        task=names.RELAY_OUTBOX,
        task_id=marker,
    )
    redis.lpush(QUEUE["default"], item)

    worker.start()
    poisoned.pids["default"] = pid_of(worker)
    stack._wait_for_workers([worker])
    letter = wait_for("the dead letter", lambda: letter_of(engine, marker), 30)
    assert letter.kind == "malformed_body"
    assert letter.raw == item.decode()
    assert_the_lane_goes_on(poisoned, engine, "default")
    assert "Unrecoverable error" not in worker.log()


def test_a_dead_letter_of_a_message_that_named_no_runnable_task_is_not_replayed(
    poisoned: Poisoned, engine: Engine
) -> None:
    marker = f"poison-{uuid.uuid4().hex}"
    poisoned.redis.lpush(QUEUE["default"], json.dumps({"hello": marker}).encode())
    letter = wait_for("the dead letter", lambda: letter_of(engine, marker), 30)

    with pytest.raises(dlq.DeadLetterError, match="not_an_envelope"):
        dlq.replay(engine, poisoned.publisher, [letter.id], SagaRegistry())
    assert letter_of(engine, marker).state == "OPEN"
