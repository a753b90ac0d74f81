"""The retry policy of every task, in one place."""

from __future__ import annotations

from celery import Task
from celery.utils.time import get_exponential_backoff_interval
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orders.db import TRANSIENT_DB_ERRORS

#: Infrastructure failures, worth another attempt: the database or Redis could not be
#: reached, a connection dropped, a deadlock or serialization failure. Business refusals
#: are return values and never come here; a constraint violation is not retried.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    *TRANSIENT_DB_ERRORS,
    RedisConnectionError,
    RedisTimeoutError,
)
#: Attempts after the first one.
MAX_RETRIES = 8
#: Backoff doubles from 1 s up to this many seconds, with full jitter. It stays far
#: below the broker's visibility timeout, so a waiting retry is never redelivered.
RETRY_BACKOFF_MAX = 30


def retry_delay(retries: int) -> int:
    """Seconds before the next attempt: exponential from 1 s, capped, fully jittered."""
    return int(
        get_exponential_backoff_interval(
            factor=1, retries=retries, maximum=RETRY_BACKOFF_MAX, full_jitter=True
        )
    )


class SagaTask(Task):  # type: ignore[misc]
    """Base of every saga task: transient errors retry with capped, jittered backoff."""

    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = True
    retry_backoff_max = RETRY_BACKOFF_MAX
    retry_jitter = True
    max_retries = MAX_RETRIES
    acks_late = True


class HousekeepingTask(Task):  # type: ignore[misc]
    """Base of periodic tasks: no retry, the next period runs them again."""

    acks_late = True
    max_retries = 0
