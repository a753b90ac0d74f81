"""Settings come from the environment, with defaults for the local run and guards."""

from __future__ import annotations

import pytest

from config.settings import POOL_PRESETS, ConfigError, load_settings


def test_defaults_make_the_local_run_work() -> None:
    settings = load_settings({})
    assert settings.env == "local"
    assert settings.database_url.startswith("postgresql+psycopg2://")
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.result_backend_url == "redis://127.0.0.1:6379/1"
    assert settings.db_pool == POOL_PRESETS["local"]
    assert settings.saga_join == "chord"


def test_reads_the_environment() -> None:
    settings = load_settings(
        {
            "APP_ENV": "staging",
            "REDIS_URL": "redis://:secret@127.0.0.1:7000/4",
            "MAX_ORDER_LINES": "7",
            "SAGA_DEADLINE_SECONDS": "2.5",
            "SAGA_JOIN": "database",
        }
    )
    assert settings.saga_join == "database"
    assert settings.result_backend_url == "redis://:secret@127.0.0.1:7000/5"
    assert settings.max_order_lines == 7
    assert settings.saga_deadline_seconds == 2.5
    assert settings.db_pool == POOL_PRESETS["staging"]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"APP_ENV": "prod"}, "APP_ENV"),
        ({"MAX_ORDER_LINES": "many"}, "MAX_ORDER_LINES"),
        ({"MAX_BODY_BYTES": "0"}, "MAX_BODY_BYTES"),
        ({"DB_POOL": "huge"}, "DB_POOL"),
        ({"TASK_TIME_LIMIT": "400", "VISIBILITY_TIMEOUT": "300"}, "TASK_TIME_LIMIT"),
        ({"RETRY_BACKOFF_MAX_SECONDS": "600"}, "RETRY_BACKOFF_MAX_SECONDS"),
        ({"SAGA_LANE": "default"}, "distinct"),
        ({"HOUSEKEEPING_LANE": "default"}, "distinct"),
        ({"EVENTS_CHECK_ROWS": "0"}, "EVENTS_CHECK_ROWS"),
        ({"EVENTS_SWEEP_ROWS": "-1"}, "EVENTS_SWEEP_ROWS"),
        ({"SAGA_JOIN": "redis"}, "SAGA_JOIN"),
        ({"SAGA_TIMEOUT_SECONDS": "20"}, "SAGA_TIMEOUT_SECONDS"),
        ({"SAGA_REDRIVE_MAX_SECONDS": "0"}, "SAGA_REDRIVE_MAX_SECONDS"),
        ({"COMPENSATION_RETRY_MAX_SECONDS": "5"}, "COMPENSATION_RETRY_MAX_SECONDS"),
        ({"COMPENSATION_MAX_ATTEMPTS": "0"}, "COMPENSATION_MAX_ATTEMPTS"),
        ({"DB_LOCK_TIMEOUT_SECONDS": "0"}, "DB_LOCK_TIMEOUT_SECONDS"),
        ({"BATCH_STALL_SECONDS": "-1"}, "BATCH_STALL_SECONDS"),
        (
            {"APP_ENV": "production", "SAGA_STEP_DELAY_SECONDS": "1"},
            "test setting",
        ),
    ],
)
def test_refuses_malformed_or_unsafe_settings(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ)


def test_the_caches_live_two_databases_past_the_broker_unless_told() -> None:
    assert load_settings({"REDIS_URL": "redis://h:6379/0"}).cache_url == "redis://h:6379/2"
    given = load_settings({"CACHE_URL": "redis://cache:6379/5"})
    assert given.cache_url == "redis://cache:6379/5"
    assert load_settings({"CACHE_URL": "off"}).cache_url is None


def test_rate_limit_is_on_in_production_and_staging_and_off_elsewhere_unless_told() -> None:
    assert load_settings({"APP_ENV": "production"}).rate_limit == "600/minute"
    assert load_settings({"APP_ENV": "staging"}).rate_limit == "600/minute"
    assert load_settings({}).rate_limit == ""
    assert load_settings({"RATE_LIMIT": "5/second;100/minute"}).rate_limit == "5/second;100/minute"
    assert load_settings({"APP_ENV": "production", "RATE_LIMIT": ""}).rate_limit == ""
    assert load_settings({"APP_ENV": "production", "RATE_LIMIT": "0"}).rate_limit == ""


def test_rate_limit_counts_in_the_caches_redis_unless_told() -> None:
    assert load_settings({}).rate_limit_storage_url == "redis://127.0.0.1:6379/2"
    off = load_settings({"REDIS_URL": "redis://h:6379/0", "CACHE_URL": "off"})
    assert off.rate_limit_storage_url == "redis://h:6379/0"
    told = load_settings({"RATE_LIMIT_STORAGE_URL": "redis://limits:6379/3"})
    assert told.rate_limit_storage_url == "redis://limits:6379/3"


def test_admission_control_is_on_except_under_tests_unless_told() -> None:
    assert load_settings({}).admission_max_backlog == 200
    assert load_settings({"APP_ENV": "test"}).admission_max_backlog == 0
    assert (
        load_settings({"APP_ENV": "test", "ADMISSION_MAX_BACKLOG": "6"}).admission_max_backlog == 6
    )
    assert load_settings({"ADMISSION_MAX_BACKLOG": "0"}).admission_max_backlog == 0


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RATE_LIMIT": "lots"}, "RATE_LIMIT"),
        ({"RATE_LIMIT": "0/minute"}, "RATE_LIMIT"),
        ({"ADMISSION_MAX_BACKLOG": "-1"}, "ADMISSION_MAX_BACKLOG"),
        ({"ADMISSION_MAX_BACKLOG": "some"}, "ADMISSION_MAX_BACKLOG"),
        ({"EVENTS_POLL_SECONDS": "0"}, "EVENTS_POLL_SECONDS"),
        ({"EVENTS_BATCH_SECONDS": "-0.1"}, "EVENTS_BATCH_SECONDS"),
        ({"DB_PREPARED_STATEMENTS": "false"}, "DB_PREPARED_STATEMENTS must be 1 or 0"),
    ],
)
def test_refuses_malformed_limits(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ)


def test_retention_keeps_a_month_a_day_of_keys_and_a_quarter_of_batch_runs_unless_told() -> None:
    settings = load_settings({})
    assert (settings.retain_sagas_days, settings.retain_events_days) == (30, 30)
    assert (settings.retain_idempotency_hours, settings.retain_dead_letters_days) == (24, 30)
    assert settings.retain_batch_runs_days == 90
    assert (settings.retention_batch_rows, settings.retention_batches_per_run) == (1000, 10)
    told = load_settings(
        {"RETAIN_SAGAS_DAYS": "7", "RETAIN_IDEMPOTENCY_HOURS": "0", "RETENTION_BATCH_ROWS": "50"}
    )
    assert (told.retain_sagas_days, told.retain_idempotency_hours) == (7, 0)
    assert told.retention_batch_rows == 50


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RETAIN_EVENTS_DAYS": "-1"}, "RETAIN_EVENTS_DAYS must be 0"),
        ({"RETENTION_BATCH_ROWS": "0"}, "RETENTION_BATCH_ROWS"),
        ({"RETENTION_INTERVAL_SECONDS": "0"}, "RETENTION_INTERVAL_SECONDS"),
    ],
)
def test_refuses_a_negative_retention_or_an_empty_batch(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ)


def test_statements_run_prepared_unless_a_pooler_in_front_says_otherwise() -> None:
    assert load_settings({}).db_prepared_statements
    assert load_settings({"DB_PREPARED_STATEMENTS": "1"}).db_prepared_statements
    assert not load_settings({"DB_PREPARED_STATEMENTS": "0"}).db_prepared_statements
