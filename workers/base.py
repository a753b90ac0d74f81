"""The retry and dead-letter policy of every task, in one place.

A transient error (``config.faults.is_transient``: the database or Redis unreachable, a
dropped connection, a deadlock, a lock timeout) is retried with exponential backoff and
jitter, capped; the delay grows from one attempt to the next until the cap. When the
retries are used up, a saga's task leaves the saga to the sweeper (its state is in
PostgreSQL; a transient fault never decides an order); any other task's message, and
any message whose error is not transient, becomes a dead letter (workers.dlq), and the
task fails, unless it declares a ``fallback`` result. A message that keeps crashing its
worker is dead-lettered without running. Business refusals are return values, never
errors, and never retry.
"""

from __future__ import annotations

import logging
import random
import traceback as tb
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from config.faults import is_transient
from workers import dlq
from workers.runtime import Runtime

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Quick tries of one database transaction inside a task, before the task itself retries
#: (a serialization failure or a dropped connection usually passes in milliseconds).
QUICK_TRIES = 3


class PoisonMessageError(RuntimeError):
    """The message was delivered more often than allowed: it crashes its worker."""


def retry_delay(retries: int, *, base: float, cap: float) -> float:
    """Seconds before retry ``retries + 1``: between half and all of min(cap, base * 2^n).

    Jitter spreads the retries of many tasks; the floor (half the step) keeps each delay
    at least as long as the previous one's ceiling halved, so delays grow until the cap."""
    step = min(cap, base * 2**retries)
    return random.uniform(step / 2, step)


def briefly_retried(action: Callable[[], T]) -> T:
    """Run a database action, trying it again a few times within half a second when it
    meets a transient error (tenacity); then let the error out."""
    for attempt in Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(QUICK_TRIES),
        wait=wait_random_exponential(multiplier=0.05, max=0.5),
        reraise=True,
    ):
        with attempt:
            return action()
    raise AssertionError("unreachable")  # pragma: no cover


class PolicyTask(Task):  # type: ignore[misc]
    """Base of every task of the system (bound to its process's runtime by ``policy``)."""

    abstract = True
    acks_late = True
    #: Celery's own cap stays out of the way: the policy below counts the retries.
    max_retries = None
    runtime: Runtime
    #: Retries for this task (None: the settings' TASK_MAX_RETRIES).
    retries: int | None = None
    #: Keep a dead letter when giving up (housekeeping that runs again soon does not).
    dead_letters: bool = True
    #: When the retries for a transient fault are used up, leave the work to a sweeper
    #: that finds it in PostgreSQL (a saga's steps and completion) instead of giving up:
    #: a fault of the infrastructure never decides an order.
    swept: bool = False

    def fallback(self, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception) -> Any:
        """The result when the task gives up; the default fails it with ``exc``."""
        raise exc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task under the policy. (The worker's tracer has already set up the
        request; calling ``run`` directly keeps its delivery info.)"""
        request = self.request
        settings = self.runtime.settings
        if self.runtime.poisoned(request):
            poison = PoisonMessageError(f"{self.name} crashed its worker too many times")
            return self.give_up("poison", poison, args, kwargs)
        try:
            return self.run(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            if not is_transient(exc):
                return self.give_up("failed", exc, args, kwargs)
            allowed = settings.task_max_retries if self.retries is None else self.retries
            if request.retries < allowed:
                delay = retry_delay(
                    request.retries,
                    base=settings.retry_backoff_seconds,
                    cap=settings.retry_backoff_max_seconds,
                )
                try:
                    raise self.retry(exc=exc, countdown=delay) from exc
                except Reject as unpublished:
                    # The retry could not be published (the broker is down): give the
                    # message back instead of dropping it; it is delivered again.
                    raise Reject(unpublished.reason, requeue=True) from exc
            if self.swept:
                logger.warning(
                    "%s[%s] still failing after %d attempts (%r); left to the sweeper",
                    self.name,
                    request.id,
                    request.retries + 1,
                    exc,
                )
                raise Ignore() from exc
            return self.give_up("exhausted", exc, args, kwargs)

    def give_up(
        self, kind: str, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Keep the message as a dead letter, then return the fallback (or fail)."""
        request = self.request
        attempts = request.retries + 1
        if not self.dead_letters:
            logger.warning(
                "%s[%s] failed (%s); it runs again soon: %r", self.name, request.id, kind, exc
            )
            return self.fallback(args, kwargs, exc)
        try:
            dlq.record(
                self.runtime.engine,
                task_id=request.id,
                task_name=self.name,
                kind=kind,
                error=f"{type(exc).__name__}: {exc}",
                args=list(args),
                kwargs=kwargs,
                queue=(request.delivery_info or {}).get("routing_key"),
                traceback="".join(tb.format_exception(exc)),
                attempts=attempts,
            )
            logger.error(
                "%s[%s] dead-lettered (%s after %d attempts): %r",
                self.name,
                request.id,
                kind,
                attempts,
                exc,
            )
        except Exception:
            # Nothing disappears silently: the message and its error are in the log.
            logger.exception(
                "%s[%s] could not be dead-lettered; args=%r kwargs=%r",
                self.name,
                request.id,
                args,
                kwargs,
            )
        return self.fallback(args, kwargs, exc)


def policy(runtime: Runtime) -> type[PolicyTask]:
    """The base task class of this process's tasks, bound to its runtime."""
    return type("Task", (PolicyTask,), {"runtime": runtime, "abstract": True})
