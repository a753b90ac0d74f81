"""``make chaos``: the full soak. 2000 orders (a tenth cancelled right after they are
accepted, racing their saga, a tenth refunded once confirmed) with faults every few
seconds (worker pool children and whole workers killed, Redis crashed and restarted,
PostgreSQL connections killed and PostgreSQL itself restarted), then every invariant.

    python -m tests.chaos.soak [--orders 2000] [--seed N] [--faults N] [--keep DIR]

Prints the seed, the fault timeline, the orders per final state and the invariants;
exits 1 if any invariant broke. The same seed replays the same load and faults.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

from config.settings import SAGA_JOINS
from tests.harness.chaos import FAULTS, ChaosPlan, run_chaos

#: How often each fault is drawn in the soak.
WEIGHTS = {
    "kill_pool_child": 5,
    "kill_worker_node": 2,
    "restart_redis": 2,
    "kill_database_backends": 2,
    "restart_database": 1,
}


def plan_for(
    seed: int, orders: int, faults: int, redis_aof: bool, saga_join: str = "chord"
) -> ChaosPlan:
    """A seeded mix of faults, every kind at least once."""
    rng = random.Random(seed)
    # fail_over_redis needs Redis behind sentinels (tests/chaos/test_redis_failover.py).
    kinds = [kind for kind in FAULTS if kind in WEIGHTS]
    drawn = kinds + rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds], k=faults - len(kinds))
    rng.shuffle(drawn)
    return ChaosPlan(
        seed=seed,
        orders=orders,
        faults=drawn,
        fault_gap=(3.0, 5.0),
        redis_aof=redis_aof,
        saga_join=saga_join,
        concurrency=24,
        customers=100,
        products=30,
        cancel_share=0.1,
        refund_share=0.1,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the soak; return 0 when every invariant held."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--faults", type=int, default=24)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument(
        "--redis-aof",
        action="store_true",
        help="Redis keeps an append-only file (restarts keep its data)",
    )
    parser.add_argument("--keep", type=Path, help="keep the run's data and logs here")
    parser.add_argument(
        "--saga-join",
        choices=SAGA_JOINS,
        default="chord",
        help="how the sagas' steps are joined (SAGA_JOIN)",
    )
    args = parser.parse_args(argv)
    plan = plan_for(args.seed, args.orders, args.faults, args.redis_aof, args.saga_join)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run_chaos(plan, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="orders-soak-") as base:
            result = run_chaos(plan, Path(base))
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
