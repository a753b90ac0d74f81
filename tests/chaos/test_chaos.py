"""A CI-sized chaos run: 300 orders (a tenth of them cancelled at once, a tenth refunded
once confirmed) while workers, Redis and PostgreSQL connections are killed; afterwards
every invariant holds. The seed is printed; a failing one replays."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.harness.chaos import ChaosPlan, run_chaos

pytestmark = pytest.mark.chaos

#: CHAOS_SEED replays a run; otherwise each run draws a new seed (and prints it).
SEED = int(os.environ.get("CHAOS_SEED") or int.from_bytes(os.urandom(4), "big"))


def test_three_hundred_orders_cancels_and_refunds_through_faults_lose_nothing() -> None:
    plan = ChaosPlan(
        seed=SEED,
        orders=300,
        faults=[
            "kill_pool_child",
            "kill_worker_node",
            "kill_pool_child",
            "restart_redis",
            "kill_database_backends",
            "kill_pool_child",
        ],
        fault_gap=(1.5, 3.0),
        cancel_share=0.1,
        refund_share=0.1,
    )
    with tempfile.TemporaryDirectory(prefix="orders-chaos-") as base:
        result = run_chaos(plan, Path(base))
    print(result.summary())
    assert result.ok, result.summary()
    assert result.report.counts.get("CONFIRMED", 0) > 0
    assert result.report.counts.get("CANCELLED", 0) > 0
    assert result.report.counts.get("REFUNDED", 0) > 0
