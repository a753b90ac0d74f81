"""The Celery configuration keeps the delivery guarantees the saga relies on."""

from __future__ import annotations

import pytest

from config import names
from config.celeryconf import celery_config
from config.settings import ConfigError, Settings, load_settings
from orders.saga import ORDER_SAGA
from workers.base import retry_delay

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
    assert vt > Settings().retry_backoff_max_seconds


def test_routes_every_saga_task_to_the_saga_lane() -> None:
    routes = CONFIG["task_routes"]
    for task in [step.task for step in ORDER_SAGA.steps] + [ORDER_SAGA.complete_task]:
        assert routes[task] == {"queue": "saga.high"}
    assert CONFIG["task_default_queue"] == "default"


def test_lanes_take_the_queue_names_the_settings_give() -> None:
    config = celery_config(Settings(saga_queue="orders.fast", batch_queue="orders.slow"))
    assert {q.name for q in config["task_queues"]} == {
        "orders.fast",
        "default",
        "orders.slow",
        "housekeeping",
        "webhooks",
    }
    assert config["task_routes"][names.RESERVE_STOCK] == {"queue": "orders.fast"}


def test_stores_no_task_results_by_default() -> None:
    assert CONFIG["task_ignore_result"] is True


def test_retry_delays_grow_with_jitter_up_to_the_cap() -> None:
    for _ in range(200):
        delays = [retry_delay(n, base=1.0, cap=30.0) for n in range(8)]
        assert all(0.5 <= d <= 30.0 for d in delays)
        # Below the cap (1, 2, 4, 8, 16 s) each delay is at least the one before it.
        assert delays[:5] == sorted(delays[:5])
        assert delays[-1] >= 15.0


def test_the_consumer_keeps_what_it_cannot_run_as_dead_letters() -> None:
    assert CONFIG["worker_consumer"] == "workers.consumer:DeadLetteringConsumer"


def test_beat_runs_the_event_consumers_integrity_check_on_a_lane_of_its_own() -> None:
    config = celery_config(Settings(events_check_every_seconds=30))
    entry = config["beat_schedule"]["check-events"]
    assert (entry["task"], entry["schedule"]) == (names.CHECK_EVENTS, 30)
    assert config["task_routes"][names.CHECK_EVENTS] == {"queue": "housekeeping"}
    # The relay and the sweeper never queue behind it.
    for task in (names.RELAY_OUTBOX, names.SWEEP_SAGAS):
        assert config["task_routes"][task] == {"queue": "default"}
    assert "housekeeping" in {queue.name for queue in config["task_queues"]}


SENTINELS = "sentinel://:secret@10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://10.0.0.3/0"


def test_a_sentinel_broker_names_its_master_everywhere_it_is_used() -> None:
    settings = load_settings(
        {
            "REDIS_URL": SENTINELS,
            "REDIS_SENTINEL_MASTER": "shop",
            "REDIS_SENTINEL_PASSWORD": "sentinels-own",
        }
    )
    assert settings.result_backend_url.endswith("sentinel://10.0.0.3/1")
    assert settings.cache_url is not None and settings.cache_url.endswith("/2")
    config = celery_config(settings)
    for options in (
        config["broker_transport_options"],
        config["result_backend_transport_options"],
    ):
        assert options["master_name"] == "shop"
        # The sentinels' password, not the master's.
        assert options["sentinel_kwargs"]["password"] == "sentinels-own"
    beat = config["redbeat_redis_options"]
    assert config["redbeat_redis_url"].startswith("redis-sentinel://")
    assert beat["service_name"] == "shop"
    assert beat["sentinels"] == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)]
    assert (beat["db"], beat["password"]) == (0, "secret")
    assert beat["sentinel_kwargs"]["password"] == "sentinels-own"


def test_a_plain_broker_has_no_sentinel_options() -> None:
    assert "master_name" not in CONFIG["broker_transport_options"]
    assert CONFIG["redbeat_redis_url"] == Settings().broker_url


def test_a_malformed_sentinel_url_is_refused_at_start() -> None:
    for url in ("sentinel://10.0.0.1:26379;redis://10.0.0.2/0", "sentinel://10.0.0.1/db"):
        with pytest.raises(ConfigError, match="Sentinel"):
            load_settings({"REDIS_URL": url})


def test_the_sentinel_password_is_kept_out_of_the_settings_repr() -> None:
    settings = load_settings({"REDIS_URL": SENTINELS, "REDIS_SENTINEL_PASSWORD": "hush"})
    assert "hush" not in repr(settings)
