"""A saga of three stages on the real processes, with either join: each stage starts
once every step of the one before has committed; a refusal compensates every applied
step of the stages reached, the latest stage first, and nothing later ever runs.

The saga is the test-only trip (workers.testing_sagas): hold_seat, then hold_room and
hold_car in parallel, then issue_ticket."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from sqlalchemy import Engine

from config.settings import Settings
from tests.conftest import Servers
from tests.harness.processes import Stack
from tests.harness.trip import Trips, check_trip, wait_until_decided
from workers.testing_sagas import HOLD_CAR, HOLD_ROOM, HOLD_SEAT, ISSUE_TICKET

pytestmark = pytest.mark.e2e

#: Each join's stack has broker databases of its own (broker, then backend).
JOINS = {"chord": 32, "database": 34}


@pytest.fixture(scope="module", params=list(JOINS))
def trip_stack(
    request: pytest.FixtureRequest, settings: Settings, servers: Servers, saga_test_tables: None
) -> Iterator[Stack]:
    """The API and a worker registering the test tasks, with the join of the param."""
    join, db = request.param, JOINS[request.param]
    own = replace(
        settings,
        broker_url=servers.redis.url(db),
        result_backend_url=servers.redis.url(db + 1),
        saga_join=join,
    )
    stack = Stack(
        own, servers.base / f"e2e-trip-{join}", extra_env={"TEST_TASKS": "1", "SAGA_JOIN": join}
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def trips(trip_stack: Stack, engine: Engine) -> Iterator[Trips]:
    trips = Trips(engine, trip_stack.settings)
    yield trips
    trips.close()


def test_three_stages_run_one_after_the_other_and_confirm(
    trip_stack: Stack, trips: Trips, engine: Engine
) -> None:
    saga_ids = [trips.start(version=1) for _ in range(2)]

    for saga_id in saga_ids:
        assert wait_until_decided(engine, saga_id).state == "CONFIRMED"
        # Every effect once, by version 1; hold_room and hold_car after hold_seat had
        # committed, issue_ticket after both of them.
        check_trip(engine, saga_id, version=1)

    log = trip_stack.service("worker").log()
    for saga_id in saga_ids:
        # The middle stage is a chord (with that join); a one-step stage is a plain task.
        chord_bodies = log.count(f"saga.trip.complete[{saga_id}.complete")
        if trip_stack.settings.saga_join == "chord":
            assert f"saga.trip.complete[{saga_id}.complete.s1]" in log
            assert chord_bodies == log.count(f"saga.trip.complete[{saga_id}.complete.s1]")
        else:
            assert chord_bodies == 0
        assert f"saga.trip.hold_car[{saga_id}.hold_car]" in log


@pytest.mark.parametrize("refused", [HOLD_SEAT, HOLD_ROOM, HOLD_CAR, ISSUE_TICKET])
def test_a_refusal_compensates_the_stages_reached_latest_first_and_runs_nothing_later(
    trips: Trips, engine: Engine, refused: str
) -> None:
    saga_id = trips.start(refused, version=1)

    row = wait_until_decided(engine, saga_id)
    assert (row.state, row.reason) == ("CANCELLED", "refused_by_test")
    # E.g. hold_room refused: hold_car then hold_seat undone, once each;
    # issue_ticket never ran.
    check_trip(engine, saga_id, version=1, refuse=refused)
