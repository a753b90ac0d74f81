"""The Celery configuration: serialization, delivery guarantees, queues, routes, beat.

Pure: this builds a mapping from the settings; the Celery app is created in ``workers``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from kombu.entity import Queue

from config import names
from config.redis_client import is_sentinel, parse, sentinel_kwargs
from config.schedules import credit_check_schedule
from config.settings import Settings

#: Seconds between kombu's sweeps that hand unacknowledged messages of a dead worker
#: back to the queue (kombu's default is ~100 s: 10 s x throttle 10).
UNACKED_RESTORE_INTERVAL = 5
#: Chord join keys (and any stored result) live this long in the result backend.
RESULT_EXPIRES = int(timedelta(days=1).total_seconds())


def celery_config(settings: Settings) -> dict[str, Any]:
    """Return the Celery configuration for these settings."""
    broker_options = {
        # Redis redelivers an unacknowledged message after this; tasks and retry
        # delays stay well below it (see Settings).
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": UNACKED_RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "health_check_interval": 10,
        **_sentinel_options(settings.broker_url, settings),
    }
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend_url,
        # JSON only: pickle in a message is remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # At-least-once delivery: ack after the task ran, requeue when the pool child
        # dies, take one message per process at a time. Every step is idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": broker_options,
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "socket_connect_timeout": 5,
            **_sentinel_options(settings.result_backend_url, settings),
        },
        # Results are not stored: the saga's outcome lives in PostgreSQL. Chord header
        # members still join through the backend's chord keys (see sagas.dispatch).
        "task_ignore_result": True,
        "result_expires": RESULT_EXPIRES,
        "task_time_limit": settings.task_time_limit,
        "task_queues": [Queue(queue) for queue in settings.queues],
        "task_default_queue": settings.default_queue,
        "task_routes": {
            task: {"queue": settings.queue(lane)} for task, lane in names.ROUTES.items()
        },
        "task_create_missing_queues": False,
        # Read by sagas.canvas.dispatch_saga: how the sagas it sends are joined.
        "orders_saga_join": settings.saga_join,
        "timezone": "UTC",
        "enable_utc": True,
        "worker_hijack_root_logger": False,
        # Undecodable messages and unknown tasks become dead letters (workers.consumer).
        "worker_consumer": "workers.consumer:DeadLetteringConsumer",
        # Beat fails over (workers.beat): any number of beats, one sends at a time. The
        # schedule and its lock live in the broker's Redis (noeviction: never evicted).
        "beat_scheduler": "workers.beat:FailoverScheduler",
        # The active beat extends its lock every tick, at least this often; a standby
        # tries to take it this often.
        "beat_max_loop_interval": settings.beat_lock_timeout_seconds / 5,
        **_redbeat_redis(settings),
        "redbeat_key_prefix": "redbeat:",
        "redbeat_lock_timeout": settings.beat_lock_timeout_seconds,
        "beat_schedule": {
            "relay-outbox": {
                "task": names.RELAY_OUTBOX,
                "schedule": settings.relay_interval_seconds,
                # A relay run that waited longer than its period is superseded by the next.
                "options": {"expires": settings.relay_interval_seconds * 5},
            },
            "credit-check": {
                "task": names.START_CREDIT_CHECK,
                "schedule": credit_check_schedule(settings),
            },
            "sweep-sagas": {
                "task": names.SWEEP_SAGAS,
                "schedule": settings.sweep_interval_seconds,
                "options": {"expires": settings.sweep_interval_seconds * 5},
            },
            "check-events": {
                "task": names.CHECK_EVENTS,
                "schedule": settings.events_check_every_seconds,
                "options": {"expires": settings.events_check_every_seconds * 2},
            },
            "sweep-batch-runs": {
                "task": names.SWEEP_BATCH_RUNS,
                "schedule": settings.batch_sweep_interval_seconds,
                "options": {"expires": settings.batch_sweep_interval_seconds * 2},
            },
            "retention": {
                "task": names.RETAIN,
                "schedule": settings.retention_interval_seconds,
                "options": {"expires": settings.retention_interval_seconds * 2},
            },
            "send-webhooks": {
                "task": names.SEND_WEBHOOKS,
                "schedule": settings.webhook_poll_seconds,
                # Runs that waited longer (the lane is busy with slow receivers) are
                # superseded by the next: the deliveries wait in PostgreSQL, not here.
                "options": {"expires": settings.webhook_poll_seconds * 5},
            },
        },
    }


def _sentinel_options(url: str, settings: Settings) -> dict[str, Any]:
    """kombu's and the result backend's options for a sentinel:// URL (none otherwise)."""
    if not is_sentinel(url):
        return {}
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": sentinel_kwargs(settings.sentinel, socket_connect_timeout=5),
    }


def _redbeat_redis(settings: Settings) -> dict[str, Any]:
    """Where beat keeps its schedule and lock: the broker's Redis, found as the broker is."""
    options: dict[str, Any] = {
        "socket_connect_timeout": 5,
        "socket_timeout": max(1.0, settings.beat_lock_timeout_seconds / 2),
        "health_check_interval": 10,
    }
    if not is_sentinel(settings.broker_url):
        return {"redbeat_redis_url": settings.broker_url, "redbeat_redis_options": options}
    target = parse(settings.broker_url)
    return {
        # celery-redbeat's own scheme for a master found through sentinels.
        "redbeat_redis_url": "redis-sentinel://",
        "redbeat_redis_options": {
            "sentinels": list(target.sentinels),
            "service_name": settings.redis_sentinel_master,
            "db": target.db,
            "username": target.username,
            "password": target.password,
            "socket_timeout": options["socket_timeout"],
            "sentinel_kwargs": sentinel_kwargs(
                settings.sentinel, socket_timeout=options["socket_timeout"]
            ),
        },
    }
