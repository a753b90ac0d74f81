"""PostgreSQL restarted (immediate mode) under load, twice, on both joins: every order
still ends as stock and credit decide; no order is cancelled for the restart and no
message becomes a dead letter (``check_decisions``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.harness.chaos import ChaosPlan, run_chaos

pytestmark = pytest.mark.chaos

SEED = int(os.environ.get("CHAOS_SEED") or int.from_bytes(os.urandom(4), "big"))


@pytest.mark.parametrize("join", ["chord", "database"])
def test_orders_placed_through_two_database_restarts_end_as_stock_and_credit_decide(
    join: str,
) -> None:
    plan = ChaosPlan(
        seed=SEED,
        orders=240,
        faults=["restart_database", "restart_database"],
        fault_gap=(3.0, 4.0),
        saga_join=join,
        # As in production: a saga worker's first statement after the restart is a
        # step's (no housekeeping task on its connections finds the restart first).
        lanes_apart=True,
    )
    with tempfile.TemporaryDirectory(prefix="orders-restarts-") as base:
        result = run_chaos(plan, Path(base))
    print(result.summary())
    assert result.ok, result.summary()
    assert result.report.counts.get("CONFIRMED", 0) > 0
    assert result.report.counts.get("CANCELLED", 0) > 0
