"""The retry policy of every task, in one place."""

from __future__ import annotations

from celery import Task
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import InterfaceError, OperationalError

#: Infrastructure failures, worth another attempt: the database or Redis could not be
#: reached, a connection dropped, a deadlock or serialization failure (OperationalError).
#: Business refusals are return values and never come here; a constraint violation
#: (IntegrityError) is a bug and is not retried.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, RedisConnectionError, RedisTimeoutError)
#: Attempts after the first one.
MAX_RETRIES = 8
#: Backoff doubles from 1 s up to this many seconds, with full jitter. It stays far
#: below the broker's visibility timeout, so a waiting retry is never redelivered.
RETRY_BACKOFF_MAX = 30


class SagaTask(Task):  # type: ignore[misc]
    """Base of every task: transient errors retry with capped, jittered backoff."""

    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = True
    retry_backoff_max = RETRY_BACKOFF_MAX
    retry_jitter = True
    max_retries = MAX_RETRIES
    acks_late = True
