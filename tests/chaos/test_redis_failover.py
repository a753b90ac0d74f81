"""The Redis master SIGKILLed under load, with Redis Sentinel: the sentinels promote the
replica, the API, the workers and beat find the new master through them, every order
still ends as stock and credit decide, and new orders confirm within a bound."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.harness.chaos import ChaosPlan, run_chaos

pytestmark = pytest.mark.chaos

SEED = int(os.environ.get("CHAOS_SEED") or int.from_bytes(os.urandom(4), "big"))


@pytest.mark.parametrize("join", ["chord", "database"])
def test_orders_placed_through_a_redis_failover_end_as_stock_and_credit_decide(
    join: str,
) -> None:
    plan = ChaosPlan(
        seed=SEED,
        orders=200,
        faults=["fail_over_redis"],
        fault_gap=(3.0, 4.0),
        saga_join=join,
        lanes_apart=True,
        redis_sentinel=True,
    )
    with tempfile.TemporaryDirectory(prefix="orders-failover-") as base:
        result = run_chaos(plan, Path(base))
    print(result.summary())
    assert result.ok, result.summary()
    assert len(result.failovers) == 1
    # Every order, those caught by the failover included, decided within a bound: the
    # saga deadline (5 s in a chaos run) and the sweeper's redrive, not a stall.
    assert result.decided_in[-1] < 30, result.summary()
    assert result.report.counts.get("CONFIRMED", 0) > 0
    assert result.report.counts.get("CANCELLED", 0) > 0
