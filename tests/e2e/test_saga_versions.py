"""Saga versions on the real processes: a saga runs to its end on the version it started
on, whatever the workers learn meanwhile; a version a worker does not have becomes a
dead letter naming it, and runs once a worker that has it replays the letter.

The saga is the test-only trip (workers.testing_sagas), whose version 2 buys an
insurance in its middle stage; ``TEST_SAGA_VERSIONS`` says which versions a process has."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from config.settings import Settings
from tests.conftest import ROOT, Servers
from tests.harness.processes import Stack, process_env
from tests.harness.trip import (
    Trips,
    check_trip,
    effects_of,
    ledger_of,
    restart_worker,
    saga_of,
    start_worker,
    wait_until_decided,
)
from tests.helpers import wait_for
from workers.tables import dead_letters
from workers.testing_sagas import BUY_INSURANCE, HOLD_SEAT, ISSUE_TICKET

pytestmark = pytest.mark.e2e

#: Seconds each step waits first (test-only setting) while the workers know version 1
#: alone: long enough to stop them with the sagas in their middle stage.
STEP_DELAY = "1"
#: The outbox relay (beat) publishes soon a stage whose publish a stopped worker cut short.
RELAY = {"RELAY_INTERVAL_SECONDS": "0.5", "OUTBOX_GRACE_SECONDS": "1"}


@pytest.fixture
def v1_stack(
    request: pytest.FixtureRequest, settings: Settings, servers: Servers, saga_test_tables: None
) -> Iterator[Stack]:
    """The API, beat and a worker that know trip version 1 only, on the broker databases
    ``request.param`` names (broker, then backend), with its extra settings."""
    db, env = request.param
    own = replace(
        settings, broker_url=servers.redis.url(db), result_backend_url=servers.redis.url(db + 1)
    )
    stack = Stack(
        own,
        servers.base / f"e2e-trip-versions-{db}",
        beat=True,
        extra_env={"TEST_TASKS": "1", "TEST_SAGA_VERSIONS": "1", **RELAY, **env},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.mark.parametrize(
    "v1_stack", [(38, {"SAGA_STEP_DELAY_SECONDS": STEP_DELAY})], indirect=True, ids=["slow-steps"]
)
def test_in_flight_sagas_finish_on_v1_while_new_ones_start_on_v2(
    v1_stack: Stack, engine: Engine
) -> None:
    old = Trips(engine, v1_stack.settings, versions=(1,))
    try:
        v1_ids = [old.start() for _ in range(2)]  # the latest it knows: version 1
    finally:
        old.close()
    wait_for(
        "the v1 trips to reach their middle stage",
        lambda: all(saga_of(engine, saga_id).stage >= 1 for saga_id in v1_ids),
        timeout=30,
    )
    assert {saga_of(engine, saga_id).state for saga_id in v1_ids} == {"RUNNING"}

    # Deploy: the workers first (they learn version 2), then what starts sagas.
    worker = v1_stack.service("worker")
    worker.stop()
    stopped_at = _now(engine)
    start_worker(v1_stack, worker, TEST_SAGA_VERSIONS="1,2", SAGA_STEP_DELAY_SECONDS="0")
    new = Trips(engine, v1_stack.settings, versions=(1, 2))
    try:
        v2_ids = [new.start() for _ in range(2)]
    finally:
        new.close()

    for saga_id in v1_ids + v2_ids:
        assert wait_until_decided(engine, saga_id).state == "CONFIRMED"
    for saga_id in v1_ids:
        # Version 1's steps only, each written by version 1; its last stage ran on the
        # workers that know both versions.
        check_trip(engine, saga_id, version=1)
        effects = effects_of(engine, saga_id)
        assert BUY_INSURANCE not in effects and BUY_INSURANCE not in ledger_of(engine, saga_id)
        assert effects[ISSUE_TICKET].applied_at > stopped_at
    for saga_id in v2_ids:
        check_trip(engine, saga_id, version=2)
        assert effects_of(engine, saga_id)[BUY_INSURANCE].version == 2


@pytest.mark.parametrize("v1_stack", [(42, {})], indirect=True, ids=["v1-worker"])
def test_a_version_the_worker_lacks_is_a_dead_letter_that_runs_once_replayed_after_deploying(
    v1_stack: Stack, engine: Engine
) -> None:
    newer = Trips(engine, v1_stack.settings, versions=(1, 2))
    try:
        saga_id = newer.start(version=2)
    finally:
        newer.close()

    letter = wait_for(
        "the v2 step to become a dead letter",
        lambda: _letter(engine, f"{saga_id}.{HOLD_SEAT}"),
        timeout=30,
    )
    assert "'trip' version 2" in letter.error and "replay" in letter.error, letter.error
    assert letter.attempts == 1  # at once, no retries
    # Not recorded: a worker that has version 2 runs it after the replay.
    assert ledger_of(engine, saga_id) == {}
    assert effects_of(engine, saga_id) == {}
    assert saga_of(engine, saga_id).state == "RUNNING"

    restart_worker(v1_stack, v1_stack.service("worker"), TEST_SAGA_VERSIONS="1,2")
    replayed = subprocess.run(
        [sys.executable, "-m", "workers.dlq", "replay", str(letter.id)],
        cwd=ROOT,
        env=process_env(v1_stack.settings, TEST_TASKS="1", TEST_SAGA_VERSIONS="1,2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replayed.returncode == 0, replayed.stderr
    assert f"{letter.id} replayed as" in replayed.stdout

    assert wait_until_decided(engine, saga_id).state == "CONFIRMED"
    check_trip(engine, saga_id, version=2)


def _letter(engine: Engine, task_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(dead_letters).where(dead_letters.c.task_id == task_id)).first()


def _now(engine: Engine) -> datetime:
    """The database's clock (the effects' times are its)."""
    with engine.connect() as conn:
        return conn.execute(select(func.now())).scalar_one()
