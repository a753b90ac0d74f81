"""Every crash window of every stage of a three-stage saga, opened on purpose in the real
processes: a worker's pool process dies at the named failpoint (its node starts another,
the message is delivered again, or the relay and the sweeper take over) and every trip
still ends decided, each applied step's effect committed once and each compensation
done once.

The saga is the test-only trip (workers.testing_sagas): hold_seat, then hold_room and
hold_car in parallel, then issue_ticket. One stack per join; the worker is restarted for
each round with that round's failpoints armed (a failpoint's firings are counted by its
name, so a round arms each name once, keyed to one step) and three trips run through
them: one confirmed, one refused in the middle stage, one refused in the last. The chord
join gets every window; the database join, whose steps complete their own stage, the
windows where that differs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.chaos.conftest import StackFactory
from tests.harness.processes import Stack
from tests.harness.trip import Trips, check_trip, restart_worker, wait_until_decided
from workers.testing_sagas import HOLD_CAR, HOLD_ROOM, HOLD_SEAT, ISSUE_TICKET, TRIP

pytestmark = pytest.mark.chaos

ADVANCE_BEFORE = f"advance.before_commit@{TRIP}"
ADVANCE_AFTER = f"advance.after_commit@{TRIP}"
COMPLETE_BEFORE = f"complete.before_commit@{TRIP}"
COMPLETE_AFTER = f"complete.after_commit@{TRIP}"

#: Rounds of windows. Between them, the chord join's open both windows of every step of
#: every stage, and each window of moving on to the next stage and of the end.
ROUNDS = {
    "chord": [
        [f"step.before_commit@{HOLD_SEAT}", f"step.after_commit@{HOLD_ROOM}", ADVANCE_BEFORE],
        [f"step.before_commit@{HOLD_ROOM}", f"step.after_commit@{HOLD_CAR}", ADVANCE_AFTER],
        [f"step.before_commit@{HOLD_CAR}", f"step.after_commit@{ISSUE_TICKET}", COMPLETE_BEFORE],
        [f"step.before_commit@{ISSUE_TICKET}", f"step.after_commit@{HOLD_SEAT}", COMPLETE_AFTER],
    ],
    # A step that is alone in its stage, or the last of its stage to commit, moves the
    # saga on or ends it itself.
    "database": [
        [
            f"step.after_commit@{HOLD_SEAT}",
            f"step.before_commit@{HOLD_ROOM}",
            ADVANCE_AFTER,
            COMPLETE_BEFORE,
        ],
        [
            f"step.after_commit@{HOLD_CAR}",
            f"step.before_commit@{ISSUE_TICKET}",
            ADVANCE_BEFORE,
            COMPLETE_AFTER,
        ],
    ],
}
#: The trips of each round, by the step each refuses (None: confirmed). Between them
#: they reach every window.
REFUSALS = [None, HOLD_CAR, ISSUE_TICKET]


def fired(folder: Path, window: str) -> bool:
    """Whether the failpoint went off (it leaves a marker per firing, by its name)."""
    return (folder / f"{window.partition('@')[0]}.0").exists()


@pytest.mark.parametrize("join", list(ROUNDS))
def test_a_worker_killed_in_any_window_of_any_stage_leaves_every_trip_decided_and_exact(
    make_stack: StackFactory, engine: Engine, saga_test_tables: None, join: str
) -> None:
    stack: Stack | None = None
    for number, windows in enumerate(ROUNDS[join], 1):
        armed = ",".join(f"{window}=kill*1" for window in windows)
        if stack is None:
            stack = make_stack(armed, SAGA_JOIN=join, TEST_TASKS="1", TEST_SAGA_VERSIONS="1")
            folder = stack.log_dir / "failpoints"
        else:
            # The next round's failpoints, counted afresh.
            folder = stack.log_dir / f"failpoints-{number}"
            worker = stack.service("worker")
            restart_worker(stack, worker, FAILPOINTS=armed, FAILPOINTS_DIR=str(folder))
        trips = Trips(engine, stack.settings, versions=(1,), join=join)
        try:
            # Looked at by the sweeper as soon as the stack's deadline (FAST_RECOVERY).
            started = {
                trips.start(refusal, deadline=timedelta(seconds=4)): refusal for refusal in REFUSALS
            }
        finally:
            trips.close()

        for saga_id in started:
            wait_until_decided(engine, saga_id, timeout=60)
        for saga_id, refusal in started.items():
            check_trip(engine, saga_id, version=1, refuse=refusal)
        assert [w for w in windows if not fired(folder, w)] == [], f"round {number}: {windows}"
