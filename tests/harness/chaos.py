"""A chaos run: real servers and processes, a bounded load of orders over HTTP, faults
on a seeded schedule, then the invariants.

Generator, nemesis, history, checker, in the manner of Jepsen: every request and its
answer is recorded (a timeout is "indeterminate", not a failure); faults are drawn from
a seed and logged on a timeline; once the system is quiet, the checker proves from
PostgreSQL and the history that nothing was lost or counted twice.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import Engine, func, insert, select

from config.database import make_engine
from config.settings import POOL_PRESETS, Settings
from orders.domain import CancelReason
from orders.tables import customers, idempotency_keys, orders, products
from scripts.services import LocalPostgres, LocalRedis, LocalSentinels
from tests.conftest import API_KEY, migrate, register_test_keys
from tests.harness.checker import Report, Violation, World, quiet, settle
from tests.harness.processes import Stack, WorkerSpec
from tests.helpers import wait_for

#: Recovery settings for a chaos run: short deadlines so lost work is found quickly.
CHAOS_ENV = {
    "SAGA_DEADLINE_SECONDS": "5",
    "SWEEP_INTERVAL_SECONDS": "1",
    "RELAY_INTERVAL_SECONDS": "0.5",
    "OUTBOX_GRACE_SECONDS": "1",
    "COMPENSATION_RETRY_SECONDS": "2",
    "VISIBILITY_TIMEOUT": "30",
    "RETRY_BACKOFF_MAX_SECONDS": "5",
    "TASK_TIME_LIMIT": "10",
}
#: The unit price of every product in a chaos world.
PRICE = 10


@dataclass(frozen=True)
class ChaosPlan:
    """What to run: the load, and the faults."""

    seed: int
    orders: int
    #: Faults in the order they are applied, spread over the load by the seed.
    faults: list[str]
    concurrency: int = 16
    customers: int = 40
    products: int = 12
    #: Seconds between two faults, drawn uniformly (the load paces itself).
    fault_gap: tuple[float, float] = (2.0, 4.0)
    #: Whether Redis writes an append-only file (faults then restart it with its data).
    redis_aof: bool = False
    worker_nodes: int = 2
    #: How the sagas' steps are joined (SAGA_JOIN): "chord" or "database".
    saga_join: str = "chord"
    #: Saga workers serve the saga lane only (as in the Procfile), and one more worker
    #: the other lanes; otherwise every worker serves every lane.
    lanes_apart: bool = False
    #: Redis as a primary, a replica and three sentinels (the system finds the master
    #: through them); the ``fail_over_redis`` fault kills the master.
    redis_sentinel: bool = False
    #: The share of orders cancelled right after they are accepted (racing their saga),
    #: and the share refunded once they are final (if confirmed).
    cancel_share: float = 0.0
    refund_share: float = 0.0


@dataclass
class Request:
    """One order a client asked for, and what it was told."""

    key: str
    customer: str
    product: str
    quantity: int
    attempts: int = 0
    status: int | None = None
    order_id: str | None = None
    error: str | None = None
    started: float = 0.0
    finished: float = 0.0
    #: "cancel" or "refund": what the client asks of the order after placing it.
    follow: str | None = None
    #: The answer to that request: its status code (None: never answered) and outcome.
    follow_status: int | None = None
    follow_outcome: str | None = None


@dataclass
class ChaosResult:
    """Everything a run saw."""

    plan: ChaosPlan
    history: list[Request]
    timeline: list[tuple[float, str, str]]
    report: Report
    extra: list[Violation]
    sampled_negatives: list[str]
    canary_seconds: list[float]
    duration: float
    counts: dict[str, int] = field(default_factory=dict)
    #: Seconds from each Redis master's death until the sentinels promoted the replica.
    failovers: list[float] = field(default_factory=list)
    #: Seconds from each final order's creation to its decision, ascending.
    decided_in: list[float] = field(default_factory=list)

    @property
    def violations(self) -> list[Violation]:
        """Every broken invariant."""
        return self.report.violations + self.extra

    @property
    def ok(self) -> bool:
        """Whether every invariant held."""
        return not self.violations

    def _decided(self, quantile: float) -> float:
        return self.decided_in[int(quantile * (len(self.decided_in) - 1))]

    def summary(self) -> str:
        """A readable account of the run: seed, faults, outcomes, invariants."""
        answered = Counter(
            str(r.status) if r.status is not None else "indeterminate" for r in self.history
        )
        lines = [
            f"chaos run, seed {self.plan.seed}: {self.plan.orders} orders, "
            f"{len(self.timeline)} faults, {self.duration:.1f} s, "
            f"steps joined by {self.plan.saga_join}",
            "fault timeline:",
            *(f"  {t:7.2f} s  {name:<22} {detail}" for t, name, detail in self.timeline),
            f"answers to clients: {dict(answered)}",
            *(
                [f"cancels and refunds asked (action, answer, outcome): {dict(follow_ups)}"]
                if (
                    follow_ups := Counter(
                        (r.follow, r.follow_status, r.follow_outcome)
                        for r in self.history
                        if r.follow
                    )
                )
                else []
            ),
            f"orders by final state: {self.report.counts}",
            *(
                ["Redis failovers, kill to promotion: " + ", ".join(promoted)]
                if (promoted := [f"{s:.1f} s" for s in self.failovers])
                else []
            ),
            (
                "orders decided in (p50 / p99 / max): "
                + " / ".join(f"{self._decided(q):.2f} s" for q in (0.5, 0.99, 1))
                if self.decided_in
                else "no order decided"
            ),
            "canary orders after the last fault: "
            + ", ".join(f"{s:.2f} s" for s in self.canary_seconds),
            f"sampled negative stock or credit: {len(self.sampled_negatives)}",
            "invariants: " + ("all hold" if self.ok else f"{len(self.violations)} broken"),
            *(f"  {v}" for v in self.violations[:30]),
        ]
        return "\n".join(lines)


class Cluster:
    """PostgreSQL, Redis and the system's processes, all owned by one chaos run."""

    def __init__(self, base: Path, plan: ChaosPlan) -> None:
        self.base = base
        self.plan = plan
        self.postgres = LocalPostgres(base, fsync=False)
        self.redis = LocalRedis(base, password=secrets.token_hex(12), appendonly=plan.redis_aof)
        self.sentinels = (
            LocalSentinels(
                base, password=secrets.token_hex(12), sentinel_password=secrets.token_hex(12)
            )
            if plan.redis_sentinel
            else None
        )
        #: Seconds from each master's death until the sentinels named another.
        self.failovers: list[float] = []
        self.stack: Stack | None = None
        self.engine: Engine | None = None

    def start(self) -> None:
        """Start the servers, migrate, then start API, workers and beat."""
        self.postgres.start()
        if self.sentinels is not None:
            self.sentinels.start()
        else:
            self.redis.start()
        self.postgres.create_database("orders")
        migrate(self.postgres.url(role="owner"))
        redis_url = self.sentinels.url if self.sentinels is not None else self.redis.url
        settings = Settings(
            env="test",
            database_url=self.postgres.url(),
            db_pool=POOL_PRESETS["test"],
            broker_url=redis_url(0),
            result_backend_url=redis_url(1),
            redis_sentinel_password=(
                self.sentinels.sentinel_password if self.sentinels is not None else None
            ),
            # Through sentinels, the caches too (on the failover's Redis).
            cache_url=redis_url(2) if self.sentinels is not None else None,
        )
        # ... and the rate limit's counts (a limit no client of the run reaches).
        limit = (
            {"RATE_LIMIT": "100000/minute", "RATE_LIMIT_STORAGE_URL": redis_url(3)}
            if self.sentinels is not None
            else {}
        )
        register_test_keys(settings, self.postgres.url(role="owner"))
        self.engine = make_engine(settings, application_name="chaos-checker")
        self.stack = Stack(
            settings,
            self.base / "logs",
            extra_env={**CHAOS_ENV, "SAGA_JOIN": self.plan.saga_join, **limit},
            beat=True,
            # The caches (sentinel runs) are kept true by the event consumers.
            events=self.sentinels is not None,
            workers=self.plan.worker_nodes,
            worker_specs=(
                [
                    *(
                        WorkerSpec(f"worker-saga-{n}", "saga.high")
                        for n in range(1, self.plan.worker_nodes + 1)
                    ),
                    WorkerSpec("worker-lanes", "default,batch.low", concurrency=1),
                    WorkerSpec("worker-housekeeping", "housekeeping", concurrency=1),
                ]
                if self.plan.lanes_apart
                else None
            ),
        )
        self.stack.start()

    def stop(self) -> None:
        """Stop everything this cluster started."""
        if self.stack is not None:
            self.stack.stop()
        if self.engine is not None:
            self.engine.dispose()
        if self.sentinels is not None:
            self.sentinels.stop()
        self.redis.stop()
        self.postgres.stop("immediate")

    # -- the nemesis's faults -----------------------------------------------------------

    def kill_pool_child(self, rng: random.Random) -> str:
        """SIGKILL one process of a worker's pool (its task is requeued)."""
        assert self.stack is not None
        node = rng.choice(self.stack.worker_nodes)
        children = node.children()
        if not children:
            return f"{node.name}: no pool child"
        child = rng.choice(children)
        signal_process(child, signal.SIGKILL)
        return f"{node.name} child {child}"

    def kill_worker_node(self, rng: random.Random) -> str:
        """SIGKILL a whole worker (its unacknowledged messages wait), restart it, and
        return once it is ready: a pool child killed while its pool is still starting
        stops a Celery worker for good (``Could not start worker processes``), which is
        a fault of its own, not this one (``make run``'s supervisor restarts it)."""
        assert self.stack is not None
        node = rng.choice(self.stack.worker_nodes)
        node.kill()
        time.sleep(2)
        started = node.log().count(" ready.")
        node.start()
        wait_for(f"{node.name} to be ready again", lambda: node.log().count(" ready.") > started)
        return node.name

    def restart_redis(self, rng: random.Random) -> str:
        """Crash Redis and start it again: with its AOF, or empty."""
        self.redis.stop(signal.SIGKILL)
        if not self.plan.redis_aof:
            for path in self.redis.dir.glob("appendonly*"):
                _remove(path)
        time.sleep(1)
        self.redis.start()
        return "with its append-only file" if self.plan.redis_aof else "empty"

    def fail_over_redis(self, rng: random.Random) -> str:
        """SIGKILL the Redis master; return once the sentinels promoted the replica."""
        assert self.sentinels is not None, "fail_over_redis needs ChaosPlan(redis_sentinel=True)"
        group = self.sentinels
        master = group.master_port()
        victim = group.primary if master == group.primary.port else group.replica
        victim.stop(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            "the sentinels to promote the replica",
            lambda: group.master_port() not in (None, victim.port),
            timeout=60,
        )
        self.failovers.append(time.monotonic() - killed)
        return f"master :{victim.port} killed, replica promoted in {self.failovers[-1]:.1f} s"

    def kill_database_backends(self, rng: random.Random) -> str:
        """Terminate every connection of the system to PostgreSQL."""
        killed = self.postgres.psql(
            "postgres",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = 'orders' AND pid <> pg_backend_pid()",
        )
        return f"{killed.strip()} connections"

    def restart_database(self, rng: random.Random) -> str:
        """Crash PostgreSQL (immediate stop: WAL recovery) and start it 3 s later."""
        self.postgres.stop("immediate")
        time.sleep(3)
        self.postgres.start()
        return "immediate stop, 3 s down"


def signal_process(pid: int, sig: int) -> None:
    """Send a signal, ignoring a process already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


FAULTS: dict[str, Callable[[Cluster, random.Random], str]] = {
    "kill_pool_child": Cluster.kill_pool_child,
    "kill_worker_node": Cluster.kill_worker_node,
    "restart_redis": Cluster.restart_redis,
    "fail_over_redis": Cluster.fail_over_redis,
    "kill_database_backends": Cluster.kill_database_backends,
    "restart_database": Cluster.restart_database,
}


def seed_world(engine: Engine, plan: ChaosPlan, rng: random.Random) -> tuple[World, list[Request]]:
    """Customers and products sized so a good share of orders is refused, and the load."""
    mean_quantity = 2
    demand = plan.orders * mean_quantity
    stock_each = max(1, int(demand * 0.8 / plan.products))
    limit_each = int(plan.orders / plan.customers * mean_quantity * PRICE * 0.85)
    tag = uuid.uuid4().hex[:6]
    customer_ids = [f"C{tag}-{n}" for n in range(plan.customers)]
    product_ids = [f"P{tag}-{n}" for n in range(plan.products)]
    with engine.begin() as conn:
        conn.execute(
            insert(customers),
            [{"id": c, "name": c, "credit_limit": limit_each} for c in customer_ids],
        )
        conn.execute(
            insert(products),
            [{"id": p, "name": p, "unit_price": PRICE, "on_hand": stock_each} for p in product_ids],
        )
    load = [
        Request(
            key=f"chaos-{plan.seed}-{n}",
            customer=rng.choice(customer_ids),
            product=rng.choice(product_ids),
            quantity=rng.randint(1, 3),
            follow=rng.choices(
                ["cancel", "refund", None],
                [plan.cancel_share, plan.refund_share, 1 - plan.cancel_share - plan.refund_share],
            )[0],
        )
        for n in range(plan.orders)
    ]
    return World(set(customer_ids), dict.fromkeys(product_ids, stock_each)), load


def send(client: httpx.Client, request: Request, retries: int = 8) -> None:
    """POST the order; retry a timeout, a dropped connection or a 5xx with the same key."""
    request.started = time.monotonic()
    body = {
        "customer_id": request.customer,
        "lines": [{"product_id": request.product, "quantity": request.quantity}],
    }
    for attempt in range(retries):
        request.attempts = attempt + 1
        try:
            response = client.post("/orders", json=body, headers={"Idempotency-Key": request.key})
        except httpx.TransportError as exc:
            request.error = type(exc).__name__
        else:
            request.status = response.status_code
            if response.status_code == 202:
                request.order_id = str(response.json()["order_id"])
                request.error = None
                break
            request.error = response.text[:200]
            if response.status_code < 500:
                break
        time.sleep(min(0.25 * 2**attempt, 3.0))
    request.finished = time.monotonic()


def act(client: httpx.Client, request: Request, retries: int = 8) -> None:
    """Ask for the request's follow-up (cancel or refund) of its order; retry a timeout, a
    dropped connection or a 5xx with the same key."""
    for attempt in range(retries):
        try:
            response = client.post(
                f"/orders/{request.order_id}/{request.follow}",
                headers={"Idempotency-Key": f"{request.key}-{request.follow}"},
            )
        except httpx.TransportError:
            pass
        else:
            request.follow_status = response.status_code
            if response.status_code == 202:
                request.follow_outcome = response.json()["outcome"]
            if response.status_code < 500:
                return
        time.sleep(min(0.25 * 2**attempt, 3.0))


def refund_when_final(client: httpx.Client, request: Request, timeout: float = 120.0) -> None:
    """Wait until the order is final; refund it if it was confirmed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = client.get(f"/orders/{request.order_id}/status")
        except httpx.TransportError:
            status = None
        if status is not None and status.status_code == 200:
            if status.json()["status"] == "CONFIRMED":
                act(client, request)
                return
            if status.json()["status"] == "CANCELLED":
                request.follow = None  # nothing to refund
                return
        time.sleep(0.2)


def check_follow_ups(engine: Engine, world: World, history: list[Request]) -> list[Violation]:
    """Cancels and refunds did what they answered, and nothing else: "cancelled" ends
    CANCELLED by the customer, "refund" ends REFUNDED; only orders a client cancelled are
    cancelled by their customer, only orders a client cancelled or refunded are REFUNDED."""
    with engine.connect() as conn:
        rows = {
            str(row.id): row
            for row in conn.execute(
                select(orders.c.id, orders.c.status, orders.c.cancel_reason).where(
                    orders.c.customer_id.in_(world.customers)
                )
            )
        }
    asked = {r.order_id: r for r in history if r.follow and r.order_id}
    found = []
    for order_id, row in rows.items():
        request = asked.get(order_id)
        by_customer = row.cancel_reason == CancelReason.CUSTOMER_CANCELLED
        if (by_customer and (request is None or request.follow != "cancel")) or (
            row.status == "REFUNDED" and request is None
        ):
            found.append(
                Violation(
                    "10 only what a client asked for is cancelled or refunded",
                    f"order {order_id} {row.status} ({row.cancel_reason}), asked {request}",
                )
            )
    for order_id, request in asked.items():
        row = rows[order_id]
        if (
            request.follow_outcome == "cancelled"
            and not (
                row.status == "CANCELLED" and (row.cancel_reason == CancelReason.CUSTOMER_CANCELLED)
            )
        ) or (request.follow_outcome == "refund" and row.status != "REFUNDED"):
            found.append(
                Violation(
                    "10 a cancel or refund does what it answered",
                    f"order {order_id}: {request.follow} answered {request.follow_status} "
                    f"{request.follow_outcome}, order {row.status} ({row.cancel_reason})",
                )
            )
    return found


class Sampler:
    """Reads the lowest stock and credit headroom every 200 ms, to catch a negative."""

    def __init__(self, engine: Engine, world: World) -> None:
        self.engine, self.world = engine, world
        self.negatives: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                with self.engine.connect() as conn:
                    low_stock = conn.execute(
                        select(
                            func.min(products.c.on_hand - products.c.reserved),
                            func.min(products.c.reserved),
                        ).where(products.c.id.in_(self.world.initial_stock))
                    ).one()
                    low_credit = conn.execute(
                        select(
                            func.min(
                                customers.c.credit_limit
                                - customers.c.credit_used
                                - customers.c.credit_reserved
                            ),
                            func.min(customers.c.credit_reserved),
                        ).where(customers.c.id.in_(self.world.customers))
                    ).one()
            except Exception as exc:  # the database is down on purpose: nothing to sample
                self.errors.append(type(exc).__name__)
                continue
            if min(low_stock) < 0 or min(low_credit) < 0:
                self.negatives.append(f"stock {tuple(low_stock)}, credit {tuple(low_credit)}")

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def check_history(engine: Engine, world: World, history: list[Request]) -> list[Violation]:
    """Invariant 1: every 202 has its order, a key names one order, no order unasked."""
    found = []
    with engine.connect() as conn:
        keyed = dict(
            conn.execute(
                select(idempotency_keys.c.key, idempotency_keys.c.order_id)
                .join(orders, orders.c.id == idempotency_keys.c.order_id)
                .where(orders.c.customer_id.in_(world.customers))
            ).all()
        )
        order_count = conn.execute(
            select(func.count())
            .select_from(orders)
            .where(orders.c.customer_id.in_(world.customers))
        ).scalar_one()
    asked = {request.key for request in history}
    for request in history:
        if request.order_id is not None and str(keyed.get(request.key)) != request.order_id:
            found.append(
                Violation(
                    "1 every 202 has its order",
                    f"{request.key}: answered {request.order_id}, stored {keyed.get(request.key)}",
                )
            )
    if order_count != len(keyed) or not set(keyed) <= asked:
        found.append(
            Violation(
                "1 no order that no client asked for",
                f"{order_count} orders, {len(keyed)} keyed, "
                f"{len(set(keyed) - asked)} with unknown keys",
            )
        )
    return found


def check_decisions(engine: Engine, world: World) -> list[Violation]:
    """Faults cost time, never a decision: an order is cancelled only because stock or
    credit said so, and no message became a dead letter."""
    from workers.tables import dead_letters

    business = [reason.value for reason in CancelReason]
    with engine.connect() as conn:
        wrong = conn.execute(
            select(orders.c.cancel_reason, func.count())
            .where(orders.c.customer_id.in_(world.customers))
            .where(orders.c.cancel_reason.is_not(None))
            .where(orders.c.cancel_reason.not_in(business))
            .group_by(orders.c.cancel_reason)
        ).all()
        letters = conn.execute(
            select(dead_letters.c.kind, dead_letters.c.task_name, dead_letters.c.error).limit(5)
        ).all()
    found = [
        Violation("only stock and credit decide", f"{count} orders cancelled as {reason}")
        for reason, count in wrong
    ]
    found += [
        Violation("no message becomes a dead letter", f"{kind} {task}: {error[:200]}")
        for kind, task, error in letters
    ]
    return found


def run_chaos(plan: ChaosPlan, base: Path, log: Callable[[str], None] = print) -> ChaosResult:
    """Run the plan on a fresh cluster under ``base``; return what happened."""
    rng = random.Random(plan.seed)
    cluster = Cluster(base, plan)
    started = time.monotonic()
    timeline: list[tuple[float, str, str]] = []
    try:
        cluster.start()
        assert cluster.engine is not None and cluster.stack is not None
        engine, stack = cluster.engine, cluster.stack
        world, load = seed_world(engine, plan, rng)
        log(f"chaos seed {plan.seed}: {plan.orders} orders, faults {plan.faults}")
        gaps = [rng.uniform(*plan.fault_gap) for _ in plan.faults]

        # The load is paced to span the faults, so every fault lands on a busy system.
        span = sum(gaps) + 2.0

        def nemesis() -> None:
            for fault, gap in zip(plan.faults, gaps, strict=True):
                time.sleep(gap)
                detail = FAULTS[fault](cluster, rng)
                timeline.append((time.monotonic() - started, fault, detail))
                log(f"  fault at {timeline[-1][0]:.1f} s: {fault} ({detail})")

        client = httpx.Client(
            base_url=stack.api_url,
            timeout=5,
            headers={"Authorization": f"Bearer {API_KEY}"},
            limits=httpx.Limits(max_connections=plan.concurrency),
        )
        with Sampler(engine, world) as sampler, client:
            faults = threading.Thread(target=nemesis)
            faults.start()
            load_started = time.monotonic()

            refunds = ThreadPoolExecutor(max_workers=8)

            def paced(numbered: tuple[int, Request]) -> None:
                n, request = numbered
                time.sleep(max(0.0, load_started + n * span / len(load) - time.monotonic()))
                send(client, request)
                if request.order_id is None:
                    return
                if request.follow == "cancel":
                    act(client, request)  # at once: it races the saga
                elif request.follow == "refund":
                    refunds.submit(refund_when_final, client, request)

            with refunds, ThreadPoolExecutor(max_workers=plan.concurrency) as pool:
                list(pool.map(paced, enumerate(load)))
            faults.join()
            canaries = canary(engine, client, world, plan, load)
            report = settle(engine, world, timeout=180)
        extra = check_history(engine, world, load) + check_decisions(engine, world)
        extra += check_follow_ups(engine, world, load)
        extra += [
            Violation(
                "the workers survive every fault",
                f"{node.name} exited on its own; its log ends:\n{node.log()[-3000:]}",
            )
            for node in stack.worker_nodes
            if node.process is None or node.process.poll() is not None
        ]
        if not quiet(engine, world):
            extra.append(Violation("2 the system went quiet", "still busy after 180 s"))
        extra += [Violation("4/5 never negative", n) for n in sampler.negatives[:10]]
        extra += [
            Violation(
                "8 a saga after the last fault completes within 10 s", f"canary took {s:.1f} s"
            )
            for s in canaries
            if s > 10
        ]
        return ChaosResult(
            plan,
            load,
            timeline,
            report,
            extra,
            sampler.negatives,
            canaries,
            time.monotonic() - started,
            failovers=cluster.failovers,
            decided_in=decision_seconds(engine, world),
        )
    finally:
        cluster.stop()


def decision_seconds(engine: Engine, world: World) -> list[float]:
    """Seconds from each final order's creation to its decision, ascending."""
    o = orders.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(func.extract("epoch", o.updated_at - o.created_at)).where(
                o.customer_id.in_(world.customers), o.status.in_(["CONFIRMED", "CANCELLED"])
            )
        ).scalars()
        return sorted(float(seconds) for seconds in rows)


def canary(
    engine: Engine, client: httpx.Client, world: World, plan: ChaosPlan, history: list[Request]
) -> list[float]:
    """After the last fault, new orders must complete within 10 s (no stuck consumer)."""
    customer = f"CANARY-{plan.seed}-{uuid.uuid4().hex[:6]}"
    product = f"CANARY-{uuid.uuid4().hex[:6]}"
    # The last fault may have ended the checker's own pooled connections too: start afresh.
    engine.dispose()
    with engine.begin() as conn:
        conn.execute(insert(customers).values(id=customer, name=customer, credit_limit=1000))
        conn.execute(insert(products).values(id=product, name=product, unit_price=1, on_hand=100))
    world.customers.add(customer)
    world.initial_stock[product] = 100
    seconds = []
    for n in range(3):
        request = Request(
            key=f"canary-{plan.seed}-{n}", customer=customer, product=product, quantity=1
        )
        send(client, request)
        history.append(request)
        begun = time.monotonic()
        while request.order_id is not None and time.monotonic() - begun < 30:
            status = client.get(f"/orders/{request.order_id}/status")
            if status.status_code == 200 and status.json()["status"] in ("CONFIRMED", "CANCELLED"):
                break
            time.sleep(0.05)
        seconds.append(time.monotonic() - request.started)
    return seconds
