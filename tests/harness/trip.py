"""Starting the test-only "trip" saga (workers.testing_sagas) from a test, and reading
what it did: its saga row, its ledger, its effects and its recorded decision."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from celery import Celery
from sqlalchemy import Engine, select

from config.settings import Settings
from sagas.definition import SagaDefinition
from sagas.registry import SagaRegistry
from sagas.tables import saga_steps, sagas
from tests.harness.processes import Service, Stack
from tests.helpers import wait_for
from workers.celery_app import create_celery
from workers.testing_sagas import (
    REFUSED_BY_TEST,
    TRIP_VERSIONS,
    effects,
    outcomes,
    register_trip,
    start_trip,
)

FINAL = ("CONFIRMED", "CANCELLED")


@dataclass(frozen=True)
class Effect:
    """One row of saga_test_effects."""

    step: str
    version: int
    undone: bool
    applied: int
    undos: int
    seen: tuple[str, ...]
    applied_at: datetime
    undone_at: datetime | None


@dataclass(frozen=True)
class SagaRow:
    """What the engine's row says of a trip."""

    state: str
    reason: str | None
    version: int
    stage: int


class Trips:
    """Starts trips on a stack's broker, as a process knowing ``versions``."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        versions: Iterable[int] = (1, 2),
        join: str | None = None,
    ) -> None:
        self.engine = engine
        self.registry = SagaRegistry()
        register_trip(self.registry, versions)
        own = replace(settings, saga_join=join) if join else settings
        self.app: Celery = create_celery(own, publisher=True)

    def start(
        self,
        refuse: str | None = None,
        *,
        version: int | None = None,
        deadline: timedelta = timedelta(seconds=30),
    ) -> UUID:
        """Start one trip (refusing the step ``refuse``); its saga id."""
        payload = {"refuse": refuse} if refuse else {}
        return start_trip(
            self.engine, self.app, self.registry, payload, version=version, deadline=deadline
        )

    def close(self) -> None:
        """Release the publisher's connections."""
        self.app.close()


def saga_of(engine: Engine, saga_id: UUID) -> SagaRow:
    """The trip's saga row now."""
    s = sagas.c
    with engine.connect() as conn:
        row = conn.execute(
            select(s.state, s.reason, s.version, s.stage).where(s.id == saga_id)
        ).one()
    return SagaRow(row.state, row.reason, row.version, row.stage)


def ledger_of(engine: Engine, saga_id: UUID) -> dict[str, str]:
    """Each recorded step's status."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(saga_steps.c.step, saga_steps.c.status).where(saga_steps.c.saga_id == saga_id)
        )
        return {row.step: row.status for row in rows}


def effects_of(engine: Engine, saga_id: UUID) -> dict[str, Effect]:
    """The trip's effects by step."""
    e = effects.c
    with engine.connect() as conn:
        rows = conn.execute(select(effects).where(e.saga_id == saga_id)).all()
    return {
        row.step: Effect(
            row.step,
            row.version,
            row.undone,
            row.applied,
            row.undos,
            tuple(row.seen),
            row.applied_at,
            row.undone_at,
        )
        for row in rows
    }


def outcome_of(engine: Engine, saga_id: UUID) -> Any:
    """The trip's recorded decision (state, reason, version, decisions), if any."""
    with engine.connect() as conn:
        return conn.execute(select(outcomes).where(outcomes.c.saga_id == saga_id)).first()


def wait_until_decided(engine: Engine, saga_id: UUID, timeout: float = 30.0) -> SagaRow:
    """Poll the saga row until the trip is CONFIRMED or CANCELLED."""

    def decided() -> SagaRow | None:
        row = saga_of(engine, saga_id)
        return row if row.state in FINAL else None

    return wait_for(f"trip {saga_id} to be decided", decided, timeout=timeout)


def expected_effects(
    definition: SagaDefinition, refuse: str | None
) -> tuple[list[str], list[str], list[str]]:
    """For a trip on ``definition`` refusing ``refuse``: the steps that apply and stay,
    the steps that apply and are undone (in the order they are undone), and the steps
    that never run."""
    stop = len(definition.stages) if refuse is None else definition.stage_of(refuse) + 1
    ran = [step.name for stage in definition.stages[:stop] for step in stage.steps]
    never = [name for name in definition.step_names if name not in ran]
    applied = [name for name in ran if name != refuse]
    if refuse is None:
        return applied, [], never
    undone = [
        step.name
        for stage in reversed(definition.stages[:stop])
        for step in reversed(stage.steps)
        if step.name != refuse
    ]
    return [], undone, never


def check_trip(engine: Engine, saga_id: UUID, *, version: int, refuse: str | None = None) -> None:
    """The decided trip is exactly what its version and refusal call for: its state and
    reason; each applied step's effect committed once, by that version's handlers, after
    every step of the earlier stages had committed its outcome; each compensation done
    once, the latest stage first; no step of a later stage ever run; one decision."""
    definition = TRIP_VERSIONS[version]
    kept, undone, never = expected_effects(definition, refuse)
    row = saga_of(engine, saga_id)
    if refuse is None:
        assert (row.state, row.reason) == ("CONFIRMED", None), row
    else:
        assert (row.state, row.reason) == ("CANCELLED", REFUSED_BY_TEST), row
    assert row.version == version, row

    done = effects_of(engine, saga_id)
    assert sorted(done) == sorted(kept + undone), done
    ledger = ledger_of(engine, saga_id)
    expected_ledger = {name: "APPLIED" for name in kept}
    expected_ledger |= {name: "COMPENSATED" for name in undone}
    expected_ledger |= {refuse: "REFUSED"} if refuse else {}
    assert ledger == expected_ledger, ledger
    assert not set(never) & set(ledger), f"later stages ran: {ledger}"

    for name, effect in done.items():
        assert (effect.version, effect.applied) == (version, 1), effect
        stage = definition.stage_of(name)
        earlier = {step.name for s in definition.stages[:stage] for step in s.steps}
        assert earlier <= set(effect.seen), f"{name} ran before {earlier - set(effect.seen)}"
        assert not set(effect.seen) & {
            step.name for s in definition.stages[stage + 1 :] for step in s.steps
        }, effect
        if name in undone:
            assert (effect.undone, effect.undos) == (True, 1), effect
        else:
            assert (effect.undone, effect.undos, effect.undone_at) == (False, 0, None), effect
    order = sorted(undone, key=lambda name: done[name].undone_at or datetime.max)
    assert order == undone, f"compensated in the order {order}, not {undone}"

    decided = outcome_of(engine, saga_id)
    assert decided is not None, "no decision was recorded"
    assert (decided.state, decided.reason, decided.version, decided.decisions) == (
        row.state,
        row.reason,
        version,
        1,
    ), decided


def restart_worker(stack: Stack, worker: Service, **env: str) -> None:
    """Stop the worker node (as the harness stops any service: SIGTERM to its process
    group, so running tasks are cut short and their messages delivered again), change its
    settings, start it again, and wait until it answers a ping."""
    worker.stop()
    start_worker(stack, worker, **env)


def start_worker(stack: Stack, worker: Service, **env: str) -> None:
    """Start the (stopped) worker node with these settings changed; wait until it
    answers a ping."""
    worker.env.update(env)
    worker.start()
    wait_for_workers(stack, [worker])


def wait_for_workers(stack: Stack, workers: list[Service], timeout: float = 60.0) -> None:
    """Wait until the worker nodes answer a ping."""
    app = create_celery(stack.settings, publisher=True)
    wanted = {f"{worker.name}-{stack.api_port}@{socket.gethostname()}" for worker in workers}
    try:

        def answered() -> bool:
            replies = {name for reply in app.control.ping(timeout=0.5) for name in reply}
            for worker in workers:
                if worker.process is not None and worker.process.poll() is not None:
                    raise RuntimeError(f"{worker.name} exited:\n{worker.log()[-3000:]}")
            return wanted <= replies

        wait_for(f"workers {wanted} to answer", answered, timeout=timeout)
    finally:
        app.close()
