"""Two real beat processes: one sends, the other stands by; SIGKILL the active one and the
standby takes over within its lock's timeout, the relay and the sweeper run again, and
every credit-check window still makes exactly one run."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select

from config import names
from config.settings import Settings
from scripts.services import free_port
from tests.conftest import Servers
from tests.harness.processes import Service, Stack
from tests.helpers import wait_for
from workers.tables import batch_runs

pytestmark = pytest.mark.e2e

LOCK_TIMEOUT = 2  # seconds; a standby tries to take the lock every LOCK_TIMEOUT / 5
SWEEP_EVERY = 1.0
RELAY_EVERY = 1.0
CREDIT_EVERY = 4  # longer than a takeover: no window may fall in the gap
ACQUIRED = "beat: Acquired lock"


@pytest.fixture(scope="module")
def failover(settings: Settings, servers: Servers) -> Iterator[Stack]:
    own = replace(
        settings, broker_url=servers.redis.url(56), result_backend_url=servers.redis.url(57)
    )
    stack = Stack(
        own,
        servers.base / "e2e-beat-failover",
        extra_env={
            "BEAT_LOCK_TIMEOUT_SECONDS": str(LOCK_TIMEOUT),
            "SWEEP_INTERVAL_SECONDS": str(SWEEP_EVERY),
            "RELAY_INTERVAL_SECONDS": str(RELAY_EVERY),
            # Read by the workers too: a run's window comes from the same schedule as beat's.
            "CREDIT_CHECK_EVERY_SECONDS": str(CREDIT_EVERY),
            "LOG_LEVEL": "INFO",
            # The housekeeping runs are counted there (they log nothing at INFO).
            "WORKER_METRICS_PORT": str(free_port()),
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def beat(stack: Stack, n: int) -> Service:
    """A beat process as the Procfile runs it, on the stack's settings."""
    env = stack.services[0].env
    return Service(
        f"beat-{n}",
        [str(Path(sys.executable).parent / "celery"), "-A", "workers.app", "beat", "-l", "INFO"],
        {**env, "PROMETHEUS_MULTIPROC_DIR": str(stack.log_dir / f"beat-metrics-{n}")},
        stack.log_dir,
    )


def test_the_standby_beat_takes_over_when_the_active_one_is_killed(
    failover: Stack, engine: Engine
) -> None:
    stack = failover
    worker = stack.service("worker")

    metrics = f"http://127.0.0.1:{worker.env['WORKER_METRICS_PORT']}/metrics"

    def succeeded(task: str) -> int:
        page = httpx.get(metrics, timeout=5).text
        return sum(
            int(sample.value)
            for family in text_string_to_metric_families(page)
            for sample in family.samples
            if sample.name == "orders_housekeeping_runs_total" and sample.labels["task"] == task
        )

    def at_least(count: int) -> list[float] | None:
        found = windows(engine, since)
        return found if len(found) >= count else None

    since = datetime.now(UTC)
    beats = [beat(stack, 1), beat(stack, 2)]
    try:
        for b in beats:
            b.start()
        wait_for("a beat to take the lock", lambda: any(ACQUIRED in b.log() for b in beats), 30)
        (active,) = [b for b in beats if ACQUIRED in b.log()]
        (standby,) = [b for b in beats if b is not active]
        # The active beat sends; the relay, the sweeper and two credit checks run.
        first = wait_for("two credit-check windows", lambda: at_least(2), 4 * CREDIT_EVERY)
        assert succeeded(names.RELAY_OUTBOX) and succeeded(names.SWEEP_SAGAS)
        assert "Sending due task" not in standby.log()  # one beat sends at a time

        active.kill()
        killed = time.monotonic()
        wait_for("the standby to take the lock", lambda: ACQUIRED in standby.log(), 30)
        took_over = time.monotonic() - killed
        # Whatever the dead beat sent has long run: a run counted from now was sent by
        # the standby.
        relays, sweeps = succeeded(names.RELAY_OUTBOX), succeeded(names.SWEEP_SAGAS)
        wait_for("a relay run", lambda: succeeded(names.RELAY_OUTBOX) > relays, 30)
        relayed = time.monotonic() - killed
        wait_for("a sweeper run", lambda: succeeded(names.SWEEP_SAGAS) > sweeps, 30)
        swept = time.monotonic() - killed
        after = wait_for(
            "two credit-check windows after the takeover",
            lambda: at_least(len(first) + 2),
            6 * CREDIT_EVERY,
        )
    except AssertionError as exc:
        logs = "\n".join(f"----- {b.name} -----\n{b.log()[-3000:]}" for b in beats)
        raise AssertionError(f"{exc}\n{logs}") from None
    finally:
        for b in beats:
            b.stop()

    print(
        f"\nbeat failover: lock taken over {took_over:.1f} s after the SIGKILL, relay ran "
        f"{relayed:.1f} s after, sweeper {swept:.1f} s after (lock timeout {LOCK_TIMEOUT} s, "
        f"standby tries every {LOCK_TIMEOUT / 5:.1f} s)"
    )
    # The bound: the lock's timeout, one try of the standby, one period of the job and
    # slack for a loaded machine (a check that nothing stalled, not a speed test).
    bound = LOCK_TIMEOUT + LOCK_TIMEOUT / 5 + max(RELAY_EVERY, SWEEP_EVERY) + 5
    assert max(relayed, swept) < bound, (relayed, swept, bound)
    # Every window from the first to the last, across the failover, made exactly one run.
    keys = Counter(run_windows(engine, since))
    span = range(int(after[0]), int(after[-1]) + 1, CREDIT_EVERY)
    assert [keys[datetime.fromtimestamp(t, UTC).isoformat()] for t in span] == [1] * len(span)


def run_windows(engine: Engine, since: datetime) -> list[str]:
    """The window keys of the scheduled runs started since ``since``."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(batch_runs.c.window_key)
                .where(batch_runs.c.window_key.not_like("manual-%"))
                .where(batch_runs.c.started_at >= since - timedelta(seconds=1))
            ).scalars()
        )


def windows(engine: Engine, since: datetime) -> list[float]:
    """The scheduled runs' windows since ``since``, as epoch seconds, in order."""
    return sorted(datetime.fromisoformat(key).timestamp() for key in run_windows(engine, since))
