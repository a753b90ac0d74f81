"""The Celery configuration keeps the delivery guarantees the saga relies on."""

from __future__ import annotations

from config import names
from config.celeryconf import celery_config
from config.settings import Settings
from sagas.order import ORDER_SAGA
from workers.base import RETRY_BACKOFF_MAX, TRANSIENT_ERRORS

CONFIG = celery_config(Settings(visibility_timeout=300, task_time_limit=60))


def test_speaks_json_only() -> None:
    for key in ("task_serializer", "result_serializer", "event_serializer"):
        assert CONFIG[key] == "json"
    assert CONFIG["accept_content"] == ["json"]
    assert CONFIG["result_accept_content"] == ["json"]


def test_acknowledges_late_and_requeues_the_task_of_a_killed_child() -> None:
    assert CONFIG["task_acks_late"] is True
    assert CONFIG["task_reject_on_worker_lost"] is True
    assert CONFIG["worker_prefetch_multiplier"] == 1


def test_every_wait_stays_below_the_visibility_timeout() -> None:
    vt = CONFIG["broker_transport_options"]["visibility_timeout"]
    assert vt == CONFIG["result_backend_transport_options"]["visibility_timeout"] == 300
    assert CONFIG["task_time_limit"] < vt
    assert vt > RETRY_BACKOFF_MAX


def test_routes_every_saga_task_to_the_saga_lane() -> None:
    routes = CONFIG["task_routes"]
    for task in [step.task for step in ORDER_SAGA.steps] + [ORDER_SAGA.complete_task]:
        assert routes[task] == {"queue": names.SAGA_QUEUE}
    assert ORDER_SAGA.queue == names.SAGA_QUEUE


def test_stores_no_task_results_by_default() -> None:
    assert CONFIG["task_ignore_result"] is True


def test_retries_infrastructure_errors_only() -> None:
    from sqlalchemy.exc import IntegrityError

    assert not any(issubclass(IntegrityError, kind) for kind in TRANSIENT_ERRORS)
