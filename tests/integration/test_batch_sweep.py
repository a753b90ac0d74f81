"""The batch sweep on real PostgreSQL and Redis: runs whose chunks were not all published
or went missing are resumed, or failed with a reason; and the command-line tools find
their settings or say what is missing."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from redis import Redis
from sqlalchemy import Engine, delete, func, select, update

from config import names
from config.celeryconf import celery_config
from config.settings import Settings
from orders.tables import customers as customer_table
from sagas.registry import SagaRegistry
from scripts.services import LocalRedis, free_port
from tests.conftest import ROOT, Servers
from tests.harness.processes import Stack, WorkerSpec
from tests.helpers import add_customer, wait_for
from workers import batch, dlq
from workers.celery_app import create_celery
from workers.tables import batch_runs

CHUNK = 10


@pytest.fixture
def swept(settings: Settings, servers: Servers) -> Iterator[Settings]:
    """Settings with a broker database of their own, small chunks and short sweep times."""
    own = replace(
        settings,
        broker_url=servers.redis.url(22),
        result_backend_url=servers.redis.url(23),
        credit_check_chunk_size=CHUNK,
        batch_publish_grace_seconds=60,
        batch_stall_seconds=600,
        batch_max_resumes=2,
    )
    Redis.from_url(own.broker_url).flushdb()
    yield own
    Redis.from_url(own.broker_url).flushdb()


@pytest.fixture
def customers(engine: Engine) -> list[str]:
    """Enough customers for at least three chunks."""
    return [add_customer(engine, limit="100.00") for _ in range(3 * CHUNK - 5)]


def queued_chunks(settings: Settings) -> list[list[Any]]:
    """The chunk messages waiting in the batch lane, oldest first: [run, number, ids]."""
    redis = Redis.from_url(settings.broker_url)
    found = []
    for raw in reversed(redis.lrange(settings.batch_queue, 0, -1)):
        message = json.loads(raw)
        assert message["headers"]["task"] == names.CREDIT_CHECK_CHUNK
        args, _, _ = json.loads(base64.b64decode(message["body"]))
        found.append(args)
    return found


def work_off(engine: Engine, settings: Settings) -> list[int]:
    """Run every queued chunk as the batch worker would; return their numbers."""
    redis = Redis.from_url(settings.broker_url)
    chunks = queued_chunks(settings)
    redis.delete(settings.batch_queue)
    for run_id, number, ids in chunks:
        batch.run_chunk(engine, UUID(run_id), number, ids)
    return [number for _, number, _ in chunks]


def status(engine: Engine, run_id: UUID) -> batch.RunStatus:
    found = batch.run_status(engine, run_id)
    assert found is not None
    return found


def later(seconds: float) -> datetime:
    """``seconds`` from now: the sweep told it is that late."""
    return datetime.now(UTC) + timedelta(seconds=seconds)


def cli(module: str, *args: str, run_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` with only these settings (and ``run_dir`` as RUN_DIR)."""
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "RUN_DIR": str(run_dir),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_manual_run_whose_broker_went_away_while_publishing_finishes_after_the_sweep(
    engine: Engine, swept: Settings, customers: list[str], tmp_path: Path
) -> None:
    broker = LocalRedis(tmp_path, password=secrets.token_hex(8))
    broker.start()
    own = replace(swept, broker_url=broker.url(0), result_backend_url=broker.url(1))
    try:
        # The operator's command publishes two chunks, then the broker goes away.
        command = subprocess.Popen(
            [sys.executable, "-m", "workers.batch", "start"],
            cwd=ROOT,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": os.environ.get("HOME", "/tmp"),
                "RUN_DIR": str(tmp_path),
                "APP_ENV": "test",
                "DATABASE_URL": own.database_url,
                "REDIS_URL": own.broker_url,
                "CREDIT_CHECK_CHUNK_SIZE": str(CHUNK),
                "FAILPOINTS": "batch.publish@2=sleep:4",
                "FAILPOINTS_DIR": str(tmp_path / "failpoints"),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for("two chunks published", lambda: len(queued_chunks(own)) == 2)
        (run_id, _, _), _ = queued_chunks(own)
        broker.stop()
        out, err = command.communicate(timeout=60)
        assert command.returncode == 1, out + err
        assert "Traceback" not in err
        assert "Redis (the broker) unreachable" in err and f"run {run_id} is recorded" in err
        run = status(engine, UUID(run_id))
        assert (run.state, run.processed, run.chunks_done) == ("PUBLISHING", 0, 0)
        assert run.chunks >= 3

        # The broker is back (empty: what it held is lost).
        broker.start()
        assert batch.sweep_runs(engine, create_celery(own, publisher=True), own) == (
            batch.SweepReport()
        )  # within its grace the publisher may still be at it
        report = batch.sweep_runs(engine, create_celery(own, publisher=True), own, now=later(61))
        assert report == batch.SweepReport(resumed=1)
        run = status(engine, UUID(run_id))
        assert (run.state, run.resumes) == ("RUNNING", 1)
        assert work_off(engine, own) == list(range(run.chunks))
        run = status(engine, UUID(run_id))
        assert (run.state, run.processed, run.failed, run.progress) == (
            "FINISHED",
            run.total,
            0,
            100.0,
        )
        assert set(customers) <= reviewed_in(engine, run_id)
    finally:
        broker.stop()


def reviewed_in(engine: Engine, run_id: str) -> set[str]:
    from orders.tables import credit_reviews

    with engine.connect() as conn:
        return set(
            conn.execute(
                select(credit_reviews.c.customer_id).where(credit_reviews.c.run_id == run_id)
            ).scalars()
        )


def test_a_run_whose_chunk_message_was_lost_is_finished_by_the_sweep(
    engine: Engine, swept: Settings, customers: list[str]
) -> None:
    publisher = create_celery(swept, publisher=True)
    run_id = batch.start_run(engine, publisher, swept, window=batch.on_demand_window())
    assert run_id is not None
    redis = Redis.from_url(swept.broker_url)
    lost = redis.lrange(swept.batch_queue, 0, 0)[0]  # the newest message: the last chunk
    assert redis.lrem(swept.batch_queue, 1, lost) == 1
    done = work_off(engine, swept)
    run = status(engine, run_id)
    assert (run.state, run.chunks_done) == ("RUNNING", run.chunks - 1)
    missing = run.chunks - 1
    assert missing not in done

    assert batch.sweep_runs(engine, publisher, swept, now=later(590)).resumed == 0
    # While no worker works the batch lane off, a stalled run is late, not lost.
    idle = batch.sweep_runs(engine, publisher, swept, now=later(10_000), lane_ready=lambda: False)
    assert idle == batch.SweepReport()
    assert status(engine, run_id).resumes == 0
    report = batch.sweep_runs(engine, publisher, swept, now=later(601))
    assert report == batch.SweepReport(resumed=1)
    assert [number for _, number, _ in queued_chunks(swept)] == [missing]  # only the lost one
    work_off(engine, swept)
    run = status(engine, run_id)
    assert (run.state, run.processed, run.chunks_done, run.resumes) == (
        "FINISHED",
        run.total,
        run.chunks,
        1,
    )


def test_a_resumed_chunk_holds_the_customers_it_was_cut_with(
    engine: Engine, swept: Settings, customers: list[str]
) -> None:
    publisher = create_celery(swept, publisher=True)
    run_id = batch.start_run(engine, publisher, swept, window=batch.on_demand_window())
    assert run_id is not None
    chunks = queued_chunks(swept)
    Redis.from_url(swept.broker_url).delete(swept.batch_queue)  # every chunk lost
    # A customer who sorts before everyone joins: cut again, every chunk would shift.
    newcomer = add_customer(engine, limit="1.00")
    with engine.begin() as conn:
        conn.execute(
            update(customer_table).where(customer_table.c.id == newcomer).values(id="0-" + newcomer)
        )
    try:
        assert batch.sweep_runs(engine, publisher, swept, now=later(601)).resumed == 1
        assert queued_chunks(swept) == chunks
        work_off(engine, swept)
        assert status(engine, run_id).state == "FINISHED"
    finally:
        with engine.begin() as conn:
            conn.execute(delete(customer_table).where(customer_table.c.id == "0-" + newcomer))


def test_a_run_that_never_moves_is_failed_with_a_reason_after_its_resumes(
    engine: Engine, swept: Settings, customers: list[str]
) -> None:
    publisher = create_celery(swept, publisher=True)
    run_id = batch.start_run(engine, publisher, swept, window=batch.on_demand_window())
    assert run_id is not None
    redis = Redis.from_url(swept.broker_url)
    first = queued_chunks(swept)[0]
    redis.delete(swept.batch_queue)
    batch.run_chunk(engine, run_id, first[1], first[2])  # chunk 0 ran; the rest are lost
    total = status(engine, run_id).total
    hours = 0.0
    for resume in (1, 2):
        hours += 1
        report = batch.sweep_runs(engine, publisher, swept, now=later(hours * 3600))
        assert report == batch.SweepReport(resumed=1)
        assert status(engine, run_id).resumes == resume
        redis.delete(swept.batch_queue)  # lost again
    report = batch.sweep_runs(engine, publisher, swept, now=later((hours + 1) * 3600))
    assert report == batch.SweepReport(failed=1)
    run = status(engine, run_id)
    assert run.state == "FAILED" and run.finished_at is not None
    assert run.reason is not None and "after 2 resume(s)" in run.reason
    assert (run.processed, run.failed, run.chunks_failed) == (
        len(first[2]),
        total - len(first[2]),
        run.chunks - 1,
    )
    assert run.progress == 100.0
    assert batch.sweep_runs(engine, publisher, swept, now=later(10 * 3600)) == (
        batch.SweepReport()
    )  # a failed run is left alone

    # Its lost chunks are dead letters: replaying one runs it and moves its customers.
    letters = [
        letter
        for letter in dlq.list_letters(
            engine, dlq.Filter(task=names.CREDIT_CHECK_CHUNK, limit=100_000)
        )
        if letter.args[0] == str(run_id)
    ]
    assert sorted(letter.args[1] for letter in letters) == list(range(1, run.chunks))
    assert all(
        letter.kind == "exhausted" and "batch run failed" in letter.error for letter in letters
    )
    replayed = letters[0]
    dlq.replay(engine, publisher, [replayed.id], SagaRegistry())
    work_off(engine, swept)
    after = status(engine, run_id)
    assert after.state == "FAILED"
    assert (after.processed, after.failed) == (
        run.processed + len(replayed.args[2]),
        run.failed - len(replayed.args[2]),
    )


def test_beat_runs_the_batch_sweep_on_the_default_lane(swept: Settings) -> None:
    config = celery_config(replace(swept, batch_sweep_interval_seconds=7))
    entry = config["beat_schedule"]["sweep-batch-runs"]
    assert (entry["task"], entry["schedule"]) == (names.SWEEP_BATCH_RUNS, 7)
    assert config["task_routes"][names.SWEEP_BATCH_RUNS] == {"queue": "default"}
    app = create_celery(swept)
    assert names.SWEEP_BATCH_RUNS in app.tasks


def count_runs(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(batch_runs)).scalar_one())


def test_the_tools_without_settings_say_what_is_missing_and_exit_non_zero(
    tmp_path: Path,
) -> None:
    for module, command in (("workers.batch", "start"), ("workers.dlq", "list")):
        # Nothing set and no .run/env: the defaults (PostgreSQL on 5432, a Redis without
        # password on 6379) are tried, and what does not answer is named.
        bare = cli(module, command, run_dir=tmp_path)
        assert bare.returncode == 1, bare
        assert "Traceback" not in bare.stderr
        assert "unreachable at" in bare.stderr
        assert f"is not set, and there is no {tmp_path / 'env'}" in bare.stderr
        assert "start `make run`" in bare.stderr

    nowhere = f"postgresql+psycopg2://orders@127.0.0.1:{free_port()}/orders"
    for module, command in (("workers.batch", "start"), ("workers.dlq", "list")):
        wrong = cli(module, command, run_dir=tmp_path, DATABASE_URL=nowhere)
        assert wrong.returncode == 1, wrong
        assert "Traceback" not in wrong.stderr
        assert f"PostgreSQL unreachable at {nowhere} (DATABASE_URL)" in wrong.stderr
        assert "check DATABASE_URL" in wrong.stderr


def test_the_tools_read_the_settings_make_run_wrote(
    engine: Engine, settings: Settings, servers: Servers, tmp_path: Path
) -> None:
    (tmp_path / "env").write_text(
        f"DATABASE_URL={settings.database_url}\nREDIS_URL={servers.redis.url(24)}\n"
    )
    listed = cli("workers.batch", "list", run_dir=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert cli("workers.dlq", "list", run_dir=tmp_path).returncode == 0

    # A broker that refuses us (no password: the incident that left runs PUBLISHING)
    # is said plainly, and no run is recorded.
    before = count_runs(engine)
    unauthenticated = servers.redis.url(24).replace(f":{servers.redis.password}@", "")
    started = cli("workers.batch", "start", run_dir=tmp_path, REDIS_URL=unauthenticated)
    assert started.returncode == 1 and "Traceback" not in started.stderr
    assert "Redis (the broker) unreachable" in started.stderr
    assert servers.redis.password not in started.stderr
    assert count_runs(engine) == before


@pytest.mark.e2e
def test_with_beat_and_a_worker_a_run_whose_command_died_while_publishing_finishes(
    engine: Engine, settings: Settings, servers: Servers, customers: list[str], tmp_path: Path
) -> None:
    own = replace(
        settings, broker_url=servers.redis.url(25), result_backend_url=servers.redis.url(26)
    )
    Redis.from_url(own.broker_url).flushdb()
    sweep = {
        "CREDIT_CHECK_CHUNK_SIZE": str(CHUNK),
        "BATCH_SWEEP_INTERVAL_SECONDS": "1",
        "BATCH_PUBLISH_GRACE_SECONDS": "2",
        "BATCH_STALL_SECONDS": "5",
    }
    stack = Stack(
        own,
        servers.base / "e2e-batch-sweep",
        worker_specs=[WorkerSpec("housekeeping", "default,batch.low", concurrency=1)],
        beat=True,
        extra_env=sweep,
    )
    try:
        stack.start()
        # The operator's command is killed after publishing its first chunk.
        died = cli(
            "workers.batch",
            "start",
            run_dir=tmp_path,
            APP_ENV="test",
            DATABASE_URL=own.database_url,
            REDIS_URL=own.broker_url,
            FAILPOINTS="batch.publish@1=kill",
            FAILPOINTS_DIR=str(tmp_path / "failpoints"),
            **sweep,
        )
        assert died.returncode == -9, died.stderr
        with engine.connect() as conn:
            run_id = conn.execute(
                select(batch_runs.c.id).order_by(batch_runs.c.started_at.desc()).limit(1)
            ).scalar_one()
        assert status(engine, run_id).state == "PUBLISHING"
        run = wait_for(
            "the run finished",
            lambda: (found := status(engine, run_id)).state == "FINISHED" and found,
            timeout=60,
        )
        assert (run.processed, run.failed, run.resumes) == (run.total, 0, 1)
    finally:
        stack.stop()
        Redis.from_url(own.broker_url).flushdb()
