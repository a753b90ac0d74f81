"""What a worker process holds: its settings, its own database engine, a Redis client."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from redis import Redis
from sqlalchemy import Engine

from config.database import make_engine
from config.redis_client import connect
from config.settings import Settings
from orders.cache import CREDIT, Caches
from orders.credit import CreditFigures
from orders.projections import credit_entry
from orders.refund_saga import REFUND_SAGA
from orders.saga import ORDER_SAGA, order_sagas
from sagas.launch import OutboxClearer
from sagas.recovery import RecoveryPolicy
from sagas.registry import SagaRegistry
from workers.escalation import escalation

#: How long the count of one message's deliveries is kept.
DELIVERY_COUNT_TTL = int(timedelta(days=1).total_seconds())


def recovery_policy(settings: Settings) -> RecoveryPolicy:
    """The sweeper's patience, from the settings."""
    return RecoveryPolicy(
        deadline=timedelta(seconds=settings.saga_deadline_seconds),
        timeout=timedelta(seconds=settings.saga_timeout_seconds),
        redrive_max=timedelta(seconds=settings.saga_redrive_max_seconds),
        recheck=timedelta(seconds=settings.sweep_interval_seconds),
        compensation_retry=timedelta(seconds=settings.compensation_retry_seconds),
        compensation_retry_max=timedelta(seconds=settings.compensation_retry_max_seconds),
        compensation_max_attempts=settings.compensation_max_attempts,
    )


def saga_registry(
    settings: Settings, on_credit: Callable[[CreditFigures], None] | None = None
) -> SagaRegistry:
    """Every saga this deployment runs, by name and version: the order domain's (their
    credit changes told to ``on_credit``), and with ``TEST_TASKS`` the test-only trip
    (its versions from ``TEST_SAGA_VERSIONS``)."""
    registry = order_sagas(on_credit)
    if settings.test_tasks:
        from workers.testing_sagas import register_trip

        register_trip(registry)
    return registry


class Runtime:
    """Per-process resources, created on first use in the process that uses them.

    A prefork child inherits its parent's memory; resources are keyed by process id, so
    each child builds its own after the fork and never reuses a socket of the parent."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Every saga's handlers by name and version (the tasks', the sweeper's).
        self.sagas = saga_registry(settings, on_credit=self._credit_changed)
        self.order_saga = self.sagas.get(ORDER_SAGA.name, ORDER_SAGA.version)
        self.refund_saga = self.sagas.get(REFUND_SAGA.name, REFUND_SAGA.version)
        self.recovery = recovery_policy(settings)
        #: A compensation given up to an operator: its dead letter (workers.escalation).
        self.escalate = escalation(self.sagas)
        self._clearer: OutboxClearer | None = None
        self._engine: Engine | None = None
        self._redis: Redis | None = None
        self._caches: Caches | None = None
        self._pid = 0

    def _fresh(self) -> None:
        if self._pid != os.getpid():
            settings = self.settings
            self._engine = make_engine(settings, application_name="orders-worker")
            self._redis = connect(settings.broker_url, settings.sentinel, socket_timeout=5)
            self._caches = (
                Caches(
                    settings.cache_url,
                    timeout=settings.cache_timeout_seconds,
                    sentinel=settings.sentinel,
                )
                if settings.cache_url
                else None
            )
            self._pid = os.getpid()

    @property
    def caches(self) -> Caches | None:
        """This process's caches (None when the settings have none)."""
        self._fresh()
        return self._caches

    def _credit_changed(self, figures: CreditFigures) -> None:
        caches = self.caches
        if caches is not None:
            caches.put(CREDIT, {figures.customer_id: credit_entry(figures)})

    @property
    def outbox_clearer(self) -> OutboxClearer:
        """Clears the outbox entries of the stages this process dispatched, in batches."""
        self._fresh()
        if self._clearer is None or self._clearer.engine is not self._engine:
            self._clearer = OutboxClearer(self.engine)
        return self._clearer

    @property
    def engine(self) -> Engine:
        """This process's engine."""
        self._fresh()
        assert self._engine is not None
        return self._engine

    @property
    def redis(self) -> Redis:
        """This process's client of the broker's Redis."""
        self._fresh()
        assert self._redis is not None
        return self._redis

    def deliveries(self, request: Any) -> int:
        """How many times this message (task id and retry number) has been delivered,
        this time included. Counted in Redis only for redelivered messages."""
        if not (request.delivery_info or {}).get("redelivered"):
            return 1
        key = f"orders:deliveries:{request.id}:{request.retries}"
        with self.redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, DELIVERY_COUNT_TTL)
            count, _ = pipe.execute()
        return int(count) + 1

    def poisoned(self, request: Any) -> bool:
        """Whether this message came back more often than allowed (it crashes workers)."""
        return self.deliveries(request) > self.settings.max_redeliveries + 1
