"""One frozen, typed settings object, read from the environment once.

Defaults make the zero-configuration local run work; production refuses unsafe values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from config import names
from config.redis_client import SentinelAccess, is_sentinel, parse

ENVIRONMENTS = ("local", "test", "staging", "production")

_N = TypeVar("_N", int, float)


class ConfigError(ValueError):
    """A setting is missing, malformed or unsafe for the chosen environment."""


@dataclass(frozen=True)
class PoolPreset:
    """SQLAlchemy connection pool sizing for one kind of deployment."""

    pool_size: int
    max_overflow: int
    pool_timeout: float
    pool_recycle: int


#: Per-environment pool presets. A prefork worker child runs one task at a time, so a
#: small pool per process suffices; the API serves one request per sync worker.
#: Budget: (web workers + worker children) x (pool_size + max_overflow) < max_connections.
POOL_PRESETS: Mapping[str, PoolPreset] = {
    "local": PoolPreset(pool_size=2, max_overflow=3, pool_timeout=5.0, pool_recycle=1800),
    "test": PoolPreset(pool_size=2, max_overflow=3, pool_timeout=5.0, pool_recycle=1800),
    "staging": PoolPreset(pool_size=3, max_overflow=5, pool_timeout=10.0, pool_recycle=1800),
    "production": PoolPreset(pool_size=5, max_overflow=10, pool_timeout=10.0, pool_recycle=1800),
}


@dataclass(frozen=True)
class Settings:
    """Everything a process of this system needs to know about its environment."""

    env: str = "local"
    database_url: str = "postgresql+psycopg2://orders@127.0.0.1:5432/orders"
    db_pool: PoolPreset = field(default_factory=lambda: POOL_PRESETS["local"])
    #: Celery broker (Redis).
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: Celery result backend (Redis); holds the chord join state.
    result_backend_url: str = "redis://127.0.0.1:6379/1"
    #: With sentinel:// URLs (config.redis_client), the name of the master the sentinels
    #: watch (REDIS_SENTINEL_MASTER) and the sentinels' own password, if they ask for one
    #: (REDIS_SENTINEL_PASSWORD).
    redis_sentinel_master: str = "orders"
    redis_sentinel_password: str | None = field(default=None, repr=False)
    #: The queue of each lane (config.names.Lane).
    saga_queue: str = names.SAGA_QUEUE
    default_queue: str = names.DEFAULT_QUEUE
    batch_queue: str = names.BATCH_QUEUE
    housekeeping_queue: str = names.HOUSEKEEPING_QUEUE
    webhooks_queue: str = names.WEBHOOKS_QUEUE
    #: Largest request body the API reads, in bytes (413 above).
    max_body_bytes: int = 64 * 1024
    #: Most lines one order may have (422 above).
    max_order_lines: int = 100
    #: Largest quantity of one line (422 above).
    max_line_quantity: int = 1_000_000
    #: A saga not finished this long after it was dispatched is looked at by the sweeper:
    #: while saga workers are consuming, its missing steps are dispatched again.
    saga_deadline_seconds: float = 30.0
    #: Each redrive of one saga waits twice as long as the one before, up to this.
    saga_redrive_max_seconds: float = 300.0
    #: The business timeout: an order still undecided this long after it was accepted
    #: is cancelled (``timed_out``). Workers being down or behind only delays orders
    #: until then; it is the one thing that gives up on an order for lack of time.
    saga_timeout_seconds: float = 4 * 3600.0
    #: How often beat runs the deadline sweeper.
    sweep_interval_seconds: float = 5.0
    #: A failed compensation is tried again after this long, doubling each time...
    compensation_retry_seconds: float = 60.0
    #: ... up to this long between two tries.
    compensation_retry_max_seconds: float = 3600.0
    #: After this many failed tries, a compensation is left to an operator: a dead letter
    #: (kind ``compensation_failed``) that replays it, and the saga stays flagged.
    compensation_max_attempts: int = 10
    #: Every database session's statement timeout (a statement running longer fails,
    #: transiently, and is retried).
    db_statement_timeout_seconds: float = 60.0
    #: How long a statement waits for a row lock before it fails (transiently).
    db_lock_timeout_seconds: float = 10.0
    #: A session idle inside a transaction this long is ended by the server, which
    #: releases its locks.
    db_idle_in_transaction_seconds: float = 60.0
    #: The hot statements run prepared on each connection (their plans kept); off
    #: (DB_PREPARED_STATEMENTS=0) behind a pooler that shares server connections
    #: between transactions (PgBouncer's transaction mode), where a statement prepared
    #: on one server connection is unknown on the next.
    db_prepared_statements: bool = True
    #: Retries of a task after its first attempt, for transient errors.
    task_max_retries: int = 8
    #: Retry delays double from this many seconds...
    retry_backoff_seconds: float = 1.0
    #: ... up to this many (far below the visibility timeout: a waiting retry is never
    #: redelivered).
    retry_backoff_max_seconds: float = 30.0
    #: A message delivered more often than this (its worker crashed each time) is not run.
    max_redeliveries: int = 5
    #: A message body larger than this is not decoded: it becomes a dead letter (too_large).
    max_message_bytes: int = 1024 * 1024
    #: The outbox relay leaves a fresh record this long to the API's own dispatch.
    outbox_grace_seconds: float = 2.0
    #: How often beat runs the outbox relay.
    relay_interval_seconds: float = 1.0
    #: Beat's lock in Redis lives this long unless the active beat extends it (every
    #: tick); a standby beat takes over within about this long after the active one died.
    beat_lock_timeout_seconds: int = 10
    #: Seconds before Redis hands an unacknowledged message to another worker.
    visibility_timeout: int = 300
    #: Hard time limit of one task; kept well below the visibility timeout.
    task_time_limit: int = 60
    #: Socket timeout of the API's publish to the broker; past it the outbox takes over.
    dispatch_timeout_seconds: float = 1.0
    #: Register the benchmark's no-op chord tasks (make bench).
    bench_tasks: bool = False
    #: Register test-only tasks (a task that fails on demand, a batch-lane no-op).
    test_tasks: bool = False
    #: When beat starts the batch credit check (crontab, UTC): nightly at 02:00.
    credit_check_cron: str = "0 2 * * *"
    #: Instead, every N seconds on aligned ticks (tests and demos); 0: use the crontab.
    credit_check_every_seconds: float = 0.0
    #: Customers per chunk of a credit check.
    credit_check_chunk_size: int = 100
    #: How often beat runs the batch sweep (stalled batch runs resumed or failed).
    batch_sweep_interval_seconds: float = 30.0
    #: A run still publishing its chunks this long after it started (or was resumed)
    #: lost its publisher: the sweep publishes its missing chunks.
    batch_publish_grace_seconds: float = 60.0
    #: A running run with no chunk outcome for this long lost chunk messages: the sweep
    #: publishes the chunks without an outcome again. Keep it above VISIBILITY_TIMEOUT
    #: and the longest time chunks may wait in their lane.
    batch_stall_seconds: float = 600.0
    #: Resumes of one run, after which the sweep fails it (its missing chunks become
    #: failed chunks and dead letters).
    batch_max_resumes: int = 3
    #: How a saga's steps are joined: "chord" (a Celery chord; its body completes the
    #: saga) or "database" (each step, once its outcome commits, completes the saga if
    #: every step has an outcome: no chord keys, no body message).
    saga_join: str = "chord"
    #: Test-only: each saga step sleeps this long first (shows the steps run in parallel).
    step_delay_seconds: float = 0.0
    #: Log level name for every process.
    log_level: str = "INFO"
    #: "text" (one line per record) or "json" (one JSON object per line, every line of
    #: every process). From the environment: LOG_FORMAT; unset, json under
    #: APP_ENV=production and text otherwise.
    log_format: str = "text"
    #: Drop Celery's routine lines (received, succeeded, sending) of the housekeeping
    #: tasks, which run every second or so (config.logs.QUIET_TASKS): LOG_QUIET_TASKS=0
    #: keeps them (the benchmark reads the jobs' durations from them).
    log_quiet_tasks: bool = True
    #: OpenTelemetry traces (config.tracing) are exported over OTLP (http/protobuf) when
    #: this is set: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT (the
    #: SDK reads the other OTEL_* variables itself); OTEL_SDK_DISABLED=true turns traces off.
    otel_endpoint: str | None = None
    #: ... and/or appended to this file, one span a JSON line (TRACES_FILE). Neither set:
    #: no tracing at all.
    traces_file: str | None = None
    #: The caches' Redis (orders.cache); None: no caches, every read from PostgreSQL.
    #: From the environment: CACHE_URL, or the broker's Redis two databases on.
    cache_url: str | None = None
    #: Refuse at once (422) an order the customer's available credit cannot cover (the
    #: credit cache answers, PostgreSQL confirms a refusal); off: such an order is
    #: accepted and cancelled by its saga.
    credit_precheck: bool = False
    #: A cache call slower than this is a miss (the read goes to PostgreSQL).
    cache_timeout_seconds: float = 0.05
    #: The event consumers look for new events this often when idle.
    events_poll_seconds: float = 0.05
    #: After a pass that applied events, the consumers wait this long before the next, so
    #: that under load each pass applies a batch (a pass costs about the same for one
    #: event as for fifty); the first events after a quiet spell wait only the poll.
    events_batch_seconds: float = 0.25
    #: A hole in the event feed (a transaction not yet committed) is waited for this long;
    #: past it, the integrity check applies what was missed.
    events_hold_seconds: float = 5.0
    #: How often beat runs the event consumers' integrity check.
    events_check_every_seconds: float = 60.0
    #: Each pass of the check looks at the orders changed since the previous pass ended,
    #: and this much before (a transaction that committed late, clocks apart).
    events_check_margin_seconds: float = 300.0
    #: Orders changed recently that one run of the check looks at, per consumer; the
    #: rest waits for the next run.
    events_check_rows: int = 20_000
    #: Orders of the whole history that one run of the check also looks at, per
    #: consumer, going round all of them (the slow sweep behind the recent window).
    events_sweep_rows: int = 2_000
    #: The event consumers serve Prometheus metrics on this port (0: not at all).
    events_metrics_port: int = 0
    #: The worker serves Prometheus metrics on this port (0: not at all).
    worker_metrics_port: int = 0
    #: Beat serves its scheduler's figures (lock held, last tick, each entry's last
    #: send) as Prometheus metrics on this port (0: not at all).
    beat_metrics_port: int = 0
    #: ... on this address (loopback unless told otherwise).
    worker_metrics_bind: str = "127.0.0.1"
    #: Requests one API key (or, without a key, one client address) may make, in the
    #: syntax of the ``limits`` library ("600/minute", "10/second;600/minute"); "" for
    #: none. From the environment: RATE_LIMIT; unset, 600/minute in staging and
    #: production and none otherwise; "" or "0" turns it off.
    rate_limit: str = ""
    #: The Redis the rate limit counts in (shared by every API process). From the
    #: environment: RATE_LIMIT_STORAGE_URL, by default the caches' Redis, else the broker's.
    rate_limit_storage_url: str | None = None
    #: POST /orders answers 503 while more messages than this wait in the saga lane
    #: (docs/performance.md says why 200); 0: never. From the environment:
    #: ADMISSION_MAX_BACKLOG; unset, 200 except under APP_ENV=test (0).
    admission_max_backlog: int = 0
    #: Retention (workers.retention): how long what is finished is kept; 0 keeps it for
    #: ever. Finished sagas and their steps (an order's timeline answers 404 after it):
    retain_sagas_days: float = 30.0
    #: Idempotency keys: a retried POST with the key after this makes a new order.
    retain_idempotency_hours: float = 24.0
    #: Order events every consumer has applied.
    retain_events_days: float = 30.0
    #: Purged dead letters.
    retain_dead_letters_days: float = 30.0
    #: Finished and failed batch runs and their chunks.
    retain_batch_runs_days: float = 90.0
    #: How often beat runs the retention job; each run removes at most
    #: RETENTION_BATCHES_PER_RUN statements of RETENTION_BATCH_ROWS rows per table.
    retention_interval_seconds: float = 60.0
    retention_batch_rows: int = 1000
    retention_batches_per_run: int = 10
    #: Webhooks (orders.webhooks): beat sends the due deliveries this often; a delivery
    #: is tried at most WEBHOOK_MAX_ATTEMPTS times (then it is DEAD and a dead letter),
    #: waiting WEBHOOK_BACKOFF_SECONDS after the first failure, doubling up to
    #: WEBHOOK_BACKOFF_MAX_SECONDS (each wait jittered); a receiver has
    #: WEBHOOK_TIMEOUT_SECONDS to connect and again to answer.
    webhook_poll_seconds: float = 1.0
    webhook_max_attempts: int = 8
    webhook_backoff_seconds: float = 30.0
    webhook_backoff_max_seconds: float = 3600.0
    webhook_timeout_seconds: float = 5.0
    #: After a rotation, the previous secret still signs (a second signature) this long.
    webhook_rotation_grace_seconds: float = 86400.0

    def queue(self, lane: names.Lane) -> str:
        """The queue of a lane."""
        return {
            names.Lane.SAGA: self.saga_queue,
            names.Lane.DEFAULT: self.default_queue,
            names.Lane.BATCH: self.batch_queue,
            names.Lane.HOUSEKEEPING: self.housekeeping_queue,
            names.Lane.WEBHOOKS: self.webhooks_queue,
        }[lane]

    @property
    def queues(self) -> tuple[str, ...]:
        """Every lane's queue."""
        return (
            self.saga_queue,
            self.default_queue,
            self.batch_queue,
            self.housekeeping_queue,
            self.webhooks_queue,
        )

    @property
    def sentinel(self) -> SentinelAccess:
        """How to find the Redis master behind a sentinel:// URL."""
        return SentinelAccess(self.redis_sentinel_master, self.redis_sentinel_password)

    def _check_redis_urls(self) -> None:
        for name in ("broker_url", "result_backend_url", "cache_url", "rate_limit_storage_url"):
            url = getattr(self, name)
            if url and is_sentinel(url):
                try:
                    parse(url)
                except ValueError as exc:
                    raise ConfigError(f"{name.upper()} (a Redis Sentinel URL): {exc}") from None
                if not self.redis_sentinel_master:
                    raise ConfigError("REDIS_SENTINEL_MASTER names the master of a sentinel URL")

    def __post_init__(self) -> None:
        """Refuse settings that are malformed or unsafe for the environment."""
        if self.env not in ENVIRONMENTS:
            raise ConfigError(f"APP_ENV must be one of {', '.join(ENVIRONMENTS)}, not {self.env!r}")
        for name in (
            "saga_deadline_seconds",
            "saga_timeout_seconds",
            "saga_redrive_max_seconds",
            "sweep_interval_seconds",
            "compensation_retry_seconds",
            "compensation_retry_max_seconds",
            "db_statement_timeout_seconds",
            "db_lock_timeout_seconds",
            "db_idle_in_transaction_seconds",
            "batch_sweep_interval_seconds",
            "beat_lock_timeout_seconds",
            "batch_publish_grace_seconds",
            "batch_stall_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.upper()} must be positive")
        if self.saga_timeout_seconds <= self.saga_deadline_seconds:
            raise ConfigError("SAGA_TIMEOUT_SECONDS must be longer than SAGA_DEADLINE_SECONDS")
        if self.saga_redrive_max_seconds < self.saga_deadline_seconds:
            raise ConfigError("SAGA_REDRIVE_MAX_SECONDS must be at least SAGA_DEADLINE_SECONDS")
        if self.compensation_retry_max_seconds < self.compensation_retry_seconds:
            raise ConfigError(
                "COMPENSATION_RETRY_MAX_SECONDS must be at least COMPENSATION_RETRY_SECONDS"
            )
        if self.retry_backoff_max_seconds >= self.visibility_timeout:
            raise ConfigError("RETRY_BACKOFF_MAX_SECONDS must be below VISIBILITY_TIMEOUT")
        if self.task_time_limit >= self.visibility_timeout:
            raise ConfigError("TASK_TIME_LIMIT must be below VISIBILITY_TIMEOUT")
        for name in (
            "max_body_bytes",
            "max_order_lines",
            "max_line_quantity",
            "max_redeliveries",
            "max_message_bytes",
            "credit_check_chunk_size",
            "compensation_max_attempts",
            "events_check_rows",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.upper()} must be positive")
        if len(set(self.queues)) != len(self.queues):
            raise ConfigError(
                "SAGA_LANE, DEFAULT_LANE, BATCH_LANE, HOUSEKEEPING_LANE and WEBHOOKS_LANE"
                " must be distinct queues"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT must be text or json, not {self.log_format!r}")
        for name in (
            "retain_sagas_days",
            "retain_idempotency_hours",
            "retain_events_days",
            "retain_dead_letters_days",
            "retain_batch_runs_days",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.upper()} must be 0 (keep for ever) or positive")
        if (
            self.retention_interval_seconds <= 0
            or self.retention_batch_rows < 1
            or self.retention_batches_per_run < 1
        ):
            raise ConfigError(
                "RETENTION_INTERVAL_SECONDS, RETENTION_BATCH_ROWS and"
                " RETENTION_BATCHES_PER_RUN must be positive"
            )
        if self.events_check_margin_seconds < 0 or self.events_sweep_rows < 0:
            raise ConfigError(
                "EVENTS_CHECK_MARGIN_SECONDS and EVENTS_SWEEP_ROWS cannot be negative"
            )
        webhook_periods = (
            self.webhook_poll_seconds,
            self.webhook_backoff_seconds,
            self.webhook_timeout_seconds,
        )
        if self.webhook_max_attempts < 1 or min(webhook_periods) <= 0:
            raise ConfigError(
                "WEBHOOK_MAX_ATTEMPTS, WEBHOOK_POLL_SECONDS, WEBHOOK_BACKOFF_SECONDS and"
                " WEBHOOK_TIMEOUT_SECONDS must be positive"
            )
        if self.webhook_backoff_max_seconds < self.webhook_backoff_seconds:
            raise ConfigError(
                "WEBHOOK_BACKOFF_MAX_SECONDS must be at least WEBHOOK_BACKOFF_SECONDS"
            )
        if self.webhook_rotation_grace_seconds < 0:
            raise ConfigError("WEBHOOK_ROTATION_GRACE_SECONDS cannot be negative")
        if self.admission_max_backlog < 0:
            raise ConfigError("ADMISSION_MAX_BACKLOG must be 0 (off) or positive")
        if not (self.events_poll_seconds > 0 and self.events_batch_seconds >= 0):
            raise ConfigError(
                "EVENTS_POLL_SECONDS must be positive, EVENTS_BATCH_SECONDS 0 or positive"
            )
        if self.rate_limit:
            _check_rate_limit(self.rate_limit)
        self._check_redis_urls()
        if self.env == "production":
            if self.step_delay_seconds:
                raise ConfigError("SAGA_STEP_DELAY_SECONDS is a test setting; not in production")
            if self.test_tasks:
                raise ConfigError("TEST_TASKS is a test setting; not in production")


def _number(environ: Mapping[str, str], name: str, kind: type[_N], default: _N) -> _N:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc


def _backend_url_from(broker_url: str) -> str:
    """Derive the result backend URL: the broker's Redis, next database number."""
    base, sep, db = broker_url.rpartition("/")
    if sep and db.isdigit() and "://" in base:
        return f"{base}/{int(db) + 1}"
    return broker_url


#: The rate limit of each key where RATE_LIMIT is unset, by environment (none elsewhere).
DEFAULT_RATE_LIMITS: Mapping[str, str] = {"staging": "600/minute", "production": "600/minute"}
#: The saga lane's backlog bound where ADMISSION_MAX_BACKLOG is unset (tests set their own).
DEFAULT_ADMISSION_MAX_BACKLOG = 200


def _check_rate_limit(given: str) -> None:
    from limits import parse_many  # the rate limiter's own grammar

    try:
        parsed = parse_many(given)
    except ValueError as exc:
        raise ConfigError(f"RATE_LIMIT={given!r} is not a rate such as 600/minute") from exc
    if not parsed or any(item.amount < 1 for item in parsed):
        raise ConfigError(f"RATE_LIMIT={given!r} must allow at least one request")


def _rate_limit(environ: Mapping[str, str], app_env: str) -> str:
    """RATE_LIMIT, or the environment's default when unset; "" or "0": no limit."""
    given = environ.get("RATE_LIMIT")
    if given is None:
        return DEFAULT_RATE_LIMITS.get(app_env, "")
    given = given.strip()
    return "" if given in ("", "0") else given


#: The ways a saga's steps can be joined (Settings.saga_join).
SAGA_JOINS = ("chord", "database")


def _saga_join(given: str) -> str:
    if given not in SAGA_JOINS:
        raise ConfigError(f"SAGA_JOIN is one of {', '.join(SAGA_JOINS)}: {given!r}")
    return given


def _cache_url(given: str | None, broker_url: str) -> str | None:
    """CACHE_URL, "off" for no caches, or by default the broker's Redis two databases on."""
    if given:
        return None if given.lower() == "off" else given
    base, sep, db = broker_url.rpartition("/")
    if sep and db.isdigit() and "://" in base:
        return f"{base}/{int(db) + 2}"
    return broker_url


def _one_or_zero(env: Mapping[str, str], name: str, default: str) -> bool:
    """A switch: 1 on, 0 off; anything else is a ConfigError (not a silent default)."""
    value = env.get(name, default).strip()
    if value not in ("0", "1"):
        raise ConfigError(f"{name} must be 1 or 0, not {value!r}")
    return value == "1"


def _off(disabled: str | None) -> bool:
    """OTEL_SDK_DISABLED, as the SDK reads it: "true" (any case) turns it off."""
    return (disabled or "").strip().lower() == "true"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from the environment (``os.environ`` unless given)."""
    env = os.environ if environ is None else environ
    d = Settings()
    app_env = env.get("APP_ENV", d.env)
    if app_env not in ENVIRONMENTS:
        raise ConfigError(f"APP_ENV must be one of {', '.join(ENVIRONMENTS)}, not {app_env!r}")
    preset = env.get("DB_POOL", app_env)
    if preset not in POOL_PRESETS:
        raise ConfigError(f"DB_POOL must be one of {', '.join(POOL_PRESETS)}, not {preset!r}")
    broker_url = env.get("REDIS_URL") or d.broker_url
    return Settings(
        env=app_env,
        database_url=env.get("DATABASE_URL") or d.database_url,
        db_pool=POOL_PRESETS[preset],
        broker_url=broker_url,
        result_backend_url=env.get("RESULT_BACKEND_URL") or _backend_url_from(broker_url),
        redis_sentinel_master=env.get("REDIS_SENTINEL_MASTER") or d.redis_sentinel_master,
        redis_sentinel_password=env.get("REDIS_SENTINEL_PASSWORD") or None,
        saga_queue=env.get("SAGA_LANE") or d.saga_queue,
        default_queue=env.get("DEFAULT_LANE") or d.default_queue,
        batch_queue=env.get("BATCH_LANE") or d.batch_queue,
        housekeeping_queue=env.get("HOUSEKEEPING_LANE") or d.housekeeping_queue,
        webhooks_queue=env.get("WEBHOOKS_LANE") or d.webhooks_queue,
        max_body_bytes=_number(env, "MAX_BODY_BYTES", int, d.max_body_bytes),
        max_order_lines=_number(env, "MAX_ORDER_LINES", int, d.max_order_lines),
        max_line_quantity=_number(env, "MAX_LINE_QUANTITY", int, d.max_line_quantity),
        saga_deadline_seconds=_number(env, "SAGA_DEADLINE_SECONDS", float, d.saga_deadline_seconds),
        sweep_interval_seconds=_number(
            env, "SWEEP_INTERVAL_SECONDS", float, d.sweep_interval_seconds
        ),
        saga_redrive_max_seconds=_number(
            env, "SAGA_REDRIVE_MAX_SECONDS", float, d.saga_redrive_max_seconds
        ),
        saga_timeout_seconds=_number(env, "SAGA_TIMEOUT_SECONDS", float, d.saga_timeout_seconds),
        compensation_retry_seconds=_number(
            env, "COMPENSATION_RETRY_SECONDS", float, d.compensation_retry_seconds
        ),
        compensation_retry_max_seconds=_number(
            env, "COMPENSATION_RETRY_MAX_SECONDS", float, d.compensation_retry_max_seconds
        ),
        compensation_max_attempts=_number(
            env, "COMPENSATION_MAX_ATTEMPTS", int, d.compensation_max_attempts
        ),
        db_statement_timeout_seconds=_number(
            env, "DB_STATEMENT_TIMEOUT_SECONDS", float, d.db_statement_timeout_seconds
        ),
        db_lock_timeout_seconds=_number(
            env, "DB_LOCK_TIMEOUT_SECONDS", float, d.db_lock_timeout_seconds
        ),
        db_idle_in_transaction_seconds=_number(
            env, "DB_IDLE_IN_TRANSACTION_SECONDS", float, d.db_idle_in_transaction_seconds
        ),
        db_prepared_statements=_one_or_zero(env, "DB_PREPARED_STATEMENTS", "1"),
        max_redeliveries=_number(env, "MAX_REDELIVERIES", int, d.max_redeliveries),
        max_message_bytes=_number(env, "MAX_MESSAGE_BYTES", int, d.max_message_bytes),
        task_max_retries=_number(env, "TASK_MAX_RETRIES", int, d.task_max_retries),
        retry_backoff_seconds=_number(env, "RETRY_BACKOFF_SECONDS", float, d.retry_backoff_seconds),
        retry_backoff_max_seconds=_number(
            env, "RETRY_BACKOFF_MAX_SECONDS", float, d.retry_backoff_max_seconds
        ),
        outbox_grace_seconds=_number(env, "OUTBOX_GRACE_SECONDS", float, d.outbox_grace_seconds),
        relay_interval_seconds=_number(
            env, "RELAY_INTERVAL_SECONDS", float, d.relay_interval_seconds
        ),
        beat_lock_timeout_seconds=_number(
            env, "BEAT_LOCK_TIMEOUT_SECONDS", int, d.beat_lock_timeout_seconds
        ),
        visibility_timeout=_number(env, "VISIBILITY_TIMEOUT", int, d.visibility_timeout),
        task_time_limit=_number(env, "TASK_TIME_LIMIT", int, d.task_time_limit),
        dispatch_timeout_seconds=_number(
            env, "DISPATCH_TIMEOUT_SECONDS", float, d.dispatch_timeout_seconds
        ),
        step_delay_seconds=_number(env, "SAGA_STEP_DELAY_SECONDS", float, d.step_delay_seconds),
        saga_join=_saga_join(env.get("SAGA_JOIN") or d.saga_join),
        bench_tasks=env.get("BENCH_TASKS", "") == "1",
        test_tasks=env.get("TEST_TASKS", "") == "1",
        credit_check_cron=env.get("CREDIT_CHECK_CRON") or d.credit_check_cron,
        credit_check_every_seconds=_number(
            env, "CREDIT_CHECK_EVERY_SECONDS", float, d.credit_check_every_seconds
        ),
        credit_check_chunk_size=_number(
            env, "CREDIT_CHECK_CHUNK_SIZE", int, d.credit_check_chunk_size
        ),
        batch_sweep_interval_seconds=_number(
            env, "BATCH_SWEEP_INTERVAL_SECONDS", float, d.batch_sweep_interval_seconds
        ),
        batch_publish_grace_seconds=_number(
            env, "BATCH_PUBLISH_GRACE_SECONDS", float, d.batch_publish_grace_seconds
        ),
        batch_stall_seconds=_number(env, "BATCH_STALL_SECONDS", float, d.batch_stall_seconds),
        batch_max_resumes=_number(env, "BATCH_MAX_RESUMES", int, d.batch_max_resumes),
        log_level=env.get("LOG_LEVEL", d.log_level).upper(),
        log_quiet_tasks=env.get("LOG_QUIET_TASKS", "1") != "0",
        log_format=(
            env.get("LOG_FORMAT") or ("json" if app_env == "production" else d.log_format)
        ).lower(),
        otel_endpoint=None
        if _off(env.get("OTEL_SDK_DISABLED"))
        else env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None,
        traces_file=None if _off(env.get("OTEL_SDK_DISABLED")) else env.get("TRACES_FILE") or None,
        cache_url=_cache_url(env.get("CACHE_URL"), broker_url),
        credit_precheck=env.get("CREDIT_PRECHECK", "") == "1",
        cache_timeout_seconds=_number(env, "CACHE_TIMEOUT_SECONDS", float, d.cache_timeout_seconds),
        events_poll_seconds=_number(env, "EVENTS_POLL_SECONDS", float, d.events_poll_seconds),
        events_batch_seconds=_number(env, "EVENTS_BATCH_SECONDS", float, d.events_batch_seconds),
        events_hold_seconds=_number(env, "EVENTS_HOLD_SECONDS", float, d.events_hold_seconds),
        events_check_every_seconds=_number(
            env, "EVENTS_CHECK_EVERY_SECONDS", float, d.events_check_every_seconds
        ),
        events_check_margin_seconds=_number(
            env, "EVENTS_CHECK_MARGIN_SECONDS", float, d.events_check_margin_seconds
        ),
        events_check_rows=_number(env, "EVENTS_CHECK_ROWS", int, d.events_check_rows),
        events_sweep_rows=_number(env, "EVENTS_SWEEP_ROWS", int, d.events_sweep_rows),
        events_metrics_port=_number(env, "EVENTS_METRICS_PORT", int, d.events_metrics_port),
        worker_metrics_port=_number(env, "WORKER_METRICS_PORT", int, d.worker_metrics_port),
        beat_metrics_port=_number(env, "BEAT_METRICS_PORT", int, d.beat_metrics_port),
        worker_metrics_bind=env.get("WORKER_METRICS_BIND", d.worker_metrics_bind),
        rate_limit=_rate_limit(env, app_env),
        rate_limit_storage_url=env.get("RATE_LIMIT_STORAGE_URL")
        or _cache_url(env.get("CACHE_URL"), broker_url)
        or broker_url,
        admission_max_backlog=_number(
            env,
            "ADMISSION_MAX_BACKLOG",
            int,
            0 if app_env == "test" else DEFAULT_ADMISSION_MAX_BACKLOG,
        ),
        retain_sagas_days=_number(env, "RETAIN_SAGAS_DAYS", float, d.retain_sagas_days),
        retain_idempotency_hours=_number(
            env, "RETAIN_IDEMPOTENCY_HOURS", float, d.retain_idempotency_hours
        ),
        retain_events_days=_number(env, "RETAIN_EVENTS_DAYS", float, d.retain_events_days),
        retain_dead_letters_days=_number(
            env, "RETAIN_DEAD_LETTERS_DAYS", float, d.retain_dead_letters_days
        ),
        retain_batch_runs_days=_number(
            env, "RETAIN_BATCH_RUNS_DAYS", float, d.retain_batch_runs_days
        ),
        retention_interval_seconds=_number(
            env, "RETENTION_INTERVAL_SECONDS", float, d.retention_interval_seconds
        ),
        retention_batch_rows=_number(env, "RETENTION_BATCH_ROWS", int, d.retention_batch_rows),
        retention_batches_per_run=_number(
            env, "RETENTION_BATCHES_PER_RUN", int, d.retention_batches_per_run
        ),
        webhook_poll_seconds=_number(env, "WEBHOOK_POLL_SECONDS", float, d.webhook_poll_seconds),
        webhook_max_attempts=_number(env, "WEBHOOK_MAX_ATTEMPTS", int, d.webhook_max_attempts),
        webhook_backoff_seconds=_number(
            env, "WEBHOOK_BACKOFF_SECONDS", float, d.webhook_backoff_seconds
        ),
        webhook_backoff_max_seconds=_number(
            env, "WEBHOOK_BACKOFF_MAX_SECONDS", float, d.webhook_backoff_max_seconds
        ),
        webhook_timeout_seconds=_number(
            env, "WEBHOOK_TIMEOUT_SECONDS", float, d.webhook_timeout_seconds
        ),
        webhook_rotation_grace_seconds=_number(
            env, "WEBHOOK_ROTATION_GRACE_SECONDS", float, d.webhook_rotation_grace_seconds
        ),
    )
