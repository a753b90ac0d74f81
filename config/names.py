"""Task names, lanes and routes, declared once.

Packages reach each other's tasks by these names (a Celery message addressed by name),
never by importing the module that registers the task.
"""

from __future__ import annotations

from enum import StrEnum


class Lane(StrEnum):
    """The lanes work travels in, each a queue served by its own worker processes."""

    #: Interactive order sagas: never behind other work.
    SAGA = "saga"
    #: Short recovery work that must run on time (outbox relay, sweeper, batch
    #: coordination) and anything unrouted.
    DEFAULT = "default"
    #: Long periodic work (the events integrity check, retention), each run bounded:
    #: their own worker, so that a slow run never holds up the relay or the sweeper.
    HOUSEKEEPING = "housekeeping"
    #: Batch work (credit checks): the lowest priority, its own workers.
    BATCH = "batch"
    #: Webhook deliveries to clients' receivers: slow or dead receivers wait here, on
    #: their own workers, never in front of a saga.
    WEBHOOKS = "webhooks"


#: The queue of each lane unless the settings name another (SAGA_LANE, DEFAULT_LANE,
#: BATCH_LANE, HOUSEKEEPING_LANE, WEBHOOKS_LANE).
SAGA_QUEUE = "saga.high"
DEFAULT_QUEUE = "default"
BATCH_QUEUE = "batch.low"
HOUSEKEEPING_QUEUE = "housekeeping"
WEBHOOKS_QUEUE = "webhooks"

#: Saga step: reserve the order's stock (chord header member).
RESERVE_STOCK = "saga.order.reserve_stock"
#: Saga step: reserve the order's credit (chord header member).
RESERVE_CREDIT = "saga.order.reserve_credit"
#: Saga completion: confirm the order or compensate and cancel it (chord body).
COMPLETE_ORDER = "saga.order.complete"
#: Refund saga step: put a refunded order's units back on hand (chord header member).
RETURN_STOCK = "saga.refund.return_stock"
#: Refund saga step: give a refunded order's amount back to the credit (chord header member).
RETURN_CREDIT = "saga.refund.return_credit"
#: Refund completion: mark the order REFUNDED, or take back what was returned (chord body).
COMPLETE_REFUND = "saga.refund.complete"
#: Outbox relay: dispatch sagas whose fast-path dispatch did not happen.
RELAY_OUTBOX = "housekeeping.relay_outbox"
#: Deadline sweeper: redrive or finish sagas past their deadline.
SWEEP_SAGAS = "housekeeping.sweep_sagas"

#: The event consumers' integrity check: apply what a consumer missed.
CHECK_EVENTS = "housekeeping.check_events"
#: Batch sweep: resume batch runs whose chunks were not all published or went missing,
#: or fail them.
SWEEP_BATCH_RUNS = "housekeeping.sweep_batch_runs"

#: Retention: remove what is finished and past its retention, a bounded batch per run.
RETAIN = "housekeeping.retain"

#: Webhooks: send the deliveries that are due (beat), a bounded batch per run.
SEND_WEBHOOKS = "webhooks.send_due"

#: Batch credit check: start a run (beat, on demand), and one chunk of it.
START_CREDIT_CHECK = "batch.credit_check.start"
CREDIT_CHECK_CHUNK = "batch.credit_check.chunk"

#: Test only (TEST_TASKS=1): a task that fails while told to, and a batch-lane no-op.
TEST_FLAKY = "testing.flaky"
TEST_BATCH_NOOP = "testing.batch_noop"
#: Test only (TEST_TASKS=1): the steps and the completion of the three-stage "trip"
#: saga (workers.testing_sagas); buy_insurance is a step of its version 2 only.
TRIP_HOLD_SEAT = "saga.trip.hold_seat"
TRIP_HOLD_ROOM = "saga.trip.hold_room"
TRIP_HOLD_CAR = "saga.trip.hold_car"
TRIP_BUY_INSURANCE = "saga.trip.buy_insurance"
TRIP_ISSUE_TICKET = "saga.trip.issue_ticket"
COMPLETE_TRIP = "saga.trip.complete"

#: Benchmark only (BENCH_TASKS=1): a no-op chord member, and its body.
BENCH_NOOP = "bench.noop"
BENCH_NOOP_DONE = "bench.noop_done"

#: The lane of each task; anything unlisted travels in the default lane.
ROUTES: dict[str, Lane] = {
    RESERVE_STOCK: Lane.SAGA,
    RESERVE_CREDIT: Lane.SAGA,
    COMPLETE_ORDER: Lane.SAGA,
    RETURN_STOCK: Lane.SAGA,
    RETURN_CREDIT: Lane.SAGA,
    COMPLETE_REFUND: Lane.SAGA,
    RELAY_OUTBOX: Lane.DEFAULT,
    SWEEP_SAGAS: Lane.DEFAULT,
    CHECK_EVENTS: Lane.HOUSEKEEPING,
    SWEEP_BATCH_RUNS: Lane.DEFAULT,
    RETAIN: Lane.HOUSEKEEPING,
    SEND_WEBHOOKS: Lane.WEBHOOKS,
    START_CREDIT_CHECK: Lane.DEFAULT,
    CREDIT_CHECK_CHUNK: Lane.BATCH,
    TEST_FLAKY: Lane.DEFAULT,
    TEST_BATCH_NOOP: Lane.BATCH,
    TRIP_HOLD_SEAT: Lane.SAGA,
    TRIP_HOLD_ROOM: Lane.SAGA,
    TRIP_HOLD_CAR: Lane.SAGA,
    TRIP_BUY_INSURANCE: Lane.SAGA,
    TRIP_ISSUE_TICKET: Lane.SAGA,
    COMPLETE_TRIP: Lane.SAGA,
    BENCH_NOOP: Lane.SAGA,
    BENCH_NOOP_DONE: Lane.SAGA,
}
