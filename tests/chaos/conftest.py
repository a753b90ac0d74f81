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

#: Redis database pairs (broker, backend) no other stack uses.
_databases = itertools.count(10, 2)

StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack(
    request: pytest.FixtureRequest, settings: Settings, servers: Servers
) -> Iterator[StackFactory]:
    """Start a stack (API, worker, beat) with its own broker databases; stopped after.

    ``redis`` gives the stack a Redis server of its own (to crash it); ``workers``
    names its worker nodes (by default one serving every lane)."""
    started: list[Stack] = []
    request.node.stacks = started  # for the failure report

    def start(
        failpoints: str = "",
        redis: LocalRedis | None = None,
        workers: list[WorkerSpec] | None = None,
        **env: str,
    ) -> Stack:
        db = next(_databases)
        server = redis or servers.redis
        own = replace(settings, broker_url=server.url(db), result_backend_url=server.url(db + 1))
        log_dir = servers.base / f"chaos-{db}"
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
    for stack in started:
        stack.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach the stacks' process logs to a failing test's report."""
    report = yield
    if report.failed:
        for stack in getattr(item, "stacks", []):
            report.sections.append(("process logs", stack.logs()))
    return report
