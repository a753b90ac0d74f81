"""Stacks with fast recovery settings and armed failpoints, one per test."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from config.settings import Settings
from scripts.services import LocalRedis
from tests.conftest import Servers
from tests.harness.processes import Stack, WorkerSpec

#: Recovery in seconds rather than minutes, so a test sees it happen.
FAST_RECOVERY = {
    "SAGA_DEADLINE_SECONDS": "4",
    "SWEEP_INTERVAL_SECONDS": "1",
    "RELAY_INTERVAL_SECONDS": "0.5",
    "OUTBOX_GRACE_SECONDS": "1",
    "COMPENSATION_RETRY_SECONDS": "2",
    "VISIBILITY_TIMEOUT": "20",
    "RETRY_BACKOFF_MAX_SECONDS": "5",
    "TASK_TIME_LIMIT": "10",
}

#: Numbers the chaos stacks' directories.
_stacks = itertools.count(1)

StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack(
    request: pytest.FixtureRequest, settings: Settings, servers: Servers
) -> Iterator[StackFactory]:
    """Start a stack (API, worker, beat) on a Redis server of its own; stopped after.

    A server of its own, not databases of the session's: what a crashed stack leaves
    behind (a chord's keys, a beat's lock, unacked messages) meets no other test.
    ``redis`` names that server (a test that crashes it starts it); ``workers`` names
    its worker nodes (by default one serving every lane)."""
    started: list[Stack] = []
    servers_started: list[LocalRedis] = []
    request.node.stacks = started  # for the failure report

    def start(
        failpoints: str = "",
        redis: LocalRedis | None = None,
        workers: list[WorkerSpec] | None = None,
        **env: str,
    ) -> Stack:
        number = next(_stacks)
        log_dir = servers.base / f"chaos-{number}"
        if redis is None:
            redis = LocalRedis(log_dir, password=servers.redis.password, name="redis-server")
            servers_started.append(redis)
            redis.start()
        own = replace(settings, broker_url=redis.url(0), result_backend_url=redis.url(1))
        stack = Stack(
            own,
            log_dir,
            beat=True,
            worker_specs=workers,
            extra_env={
                **FAST_RECOVERY,
                "FAILPOINTS": failpoints,
                "FAILPOINTS_DIR": str(log_dir / "failpoints"),
                **env,
            },
        )
        started.append(stack)
        stack.start()
        return stack

    yield start
    try:
        for stack in started:
            stack.stop()
    finally:
        for server in servers_started:
            server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach the stacks' process logs to a failing test's report."""
    report = yield
    if report.failed:
        for stack in getattr(item, "stacks", []):
            report.sections.append(("process logs", stack.logs()))
    return report
