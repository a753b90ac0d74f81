"""The real processes for end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from config.settings import Settings
from tests.conftest import Servers
from tests.harness.client import Api
from tests.harness.processes import Stack

pytestmark = pytest.mark.e2e


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach the stack's process logs to a failing end-to-end test's report."""
    report = yield
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Stack):
                report.sections.append((f"process logs of {name}", value.logs()))
    return report


@pytest.fixture(scope="session")
def stack(settings: Settings, servers: Servers) -> Iterator[Stack]:
    """gunicorn serving the API and a prefork saga worker, for the e2e session."""
    stack = Stack(settings, servers.base / "e2e")
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def api(stack: Stack) -> Api:
    return stack.client()
