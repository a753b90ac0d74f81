"""Task and queue names, declared once.

Packages reach each other's tasks by these names (a Celery message addressed by name),
never by importing the module that registers the task.
"""

from __future__ import annotations

#: The lane for interactive order sagas: its own worker processes, never behind batch work.
SAGA_QUEUE = "saga.high"
#: Housekeeping (outbox relay) and anything not routed elsewhere.
DEFAULT_QUEUE = "default"

#: Saga step: reserve the order's stock (chord header member).
RESERVE_STOCK = "saga.order.reserve_stock"
#: Saga step: reserve the order's credit (chord header member).
RESERVE_CREDIT = "saga.order.reserve_credit"
#: Saga completion: confirm the order or compensate and cancel it (chord body).
COMPLETE_ORDER = "saga.order.complete"
#: Outbox relay: dispatch sagas whose fast-path dispatch did not happen.
RELAY_OUTBOX = "housekeeping.relay_outbox"
#: Deadline sweeper: redrive or finish sagas past their deadline.
SWEEP_SAGAS = "housekeeping.sweep_sagas"

#: Benchmark only (BENCH_TASKS=1): a no-op chord member, and its body.
BENCH_NOOP = "bench.noop"
BENCH_NOOP_DONE = "bench.noop_done"

#: Routes by task name; anything unlisted goes to DEFAULT_QUEUE.
ROUTES: dict[str, str] = {
    RESERVE_STOCK: SAGA_QUEUE,
    RESERVE_CREDIT: SAGA_QUEUE,
    COMPLETE_ORDER: SAGA_QUEUE,
    RELAY_OUTBOX: DEFAULT_QUEUE,
    SWEEP_SAGAS: DEFAULT_QUEUE,
    BENCH_NOOP: SAGA_QUEUE,
    BENCH_NOOP_DONE: SAGA_QUEUE,
}
