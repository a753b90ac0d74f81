"""Saga definitions: stages of steps run in parallel, by which task names, in which
version. Pure data.

Where the tasks travel is the routes' business (config.names), not the definition's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class Step:
    """One step: its ledger name and the Celery task (by name) that performs it."""

    name: str
    task: str


@dataclass(frozen=True)
class Stage:
    """Steps that run in parallel; the next stage starts once every one of them applied."""

    steps: tuple[Step, ...]


@dataclass(frozen=True)
class SagaDefinition:
    """Stages run one after the other, the steps of each in parallel; the completion
    task of the saga's name decides each stage: on to the next, confirm, or compensate."""

    name: str
    stages: tuple[Stage, ...]
    #: The task that advances, confirms or compensates once every step of the running
    #: stage has an outcome (one per saga name, shared by its versions).
    complete_task: str
    #: The definition's version: a saga runs to its end on the version it started on.
    version: int = 1

    def __post_init__(self) -> None:
        """Refuse a definition with no stage, an empty stage, a step named twice (in any
        stages: the ledger's key is the saga and the step), or a version below 1."""
        if not self.stages or any(not stage.steps for stage in self.stages):
            raise ValueError(f"saga {self.name!r} needs stages of at least one step each")
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"saga {self.name!r} needs distinct steps, got {names}")
        if self.version < 1:
            raise ValueError(f"saga {self.name!r}: a version is 1 or more, got {self.version}")

    @property
    def steps(self) -> tuple[Step, ...]:
        """Every step, stage after stage, each stage's in declaration order."""
        return tuple(step for stage in self.stages for step in stage.steps)

    @property
    def step_names(self) -> tuple[str, ...]:
        """The steps' names, stage after stage, in declaration order."""
        return tuple(step.name for step in self.steps)

    def stage_of(self, step: str) -> int:
        """The index of the stage that holds ``step`` (ValueError if none does)."""
        for index, stage in enumerate(self.stages):
            if any(candidate.name == step for candidate in stage.steps):
                return index
        raise ValueError(f"saga {self.name!r} version {self.version} has no step {step!r}")

    def step_of_task(self, task: str) -> Step | None:
        """The step that ``task`` performs in this version, if any."""
        return next((step for step in self.steps if step.task == task), None)


class UnknownSagaVersion(LookupError):
    """This process has no handlers for that saga and version (not deployed here)."""

    def __init__(self, name: str, version: int, known: Iterable[int] = ()) -> None:
        self.name = name
        self.version = version
        self.known = tuple(sorted(known))
        has = (
            f"it has version{'s' if len(self.known) > 1 else ''} " + ", ".join(map(str, self.known))
            if self.known
            else "it has no version of it"
        )
        super().__init__(
            f"saga {name!r} version {version} is not deployed on this worker ({has}):"
            " deploy it, then replay this letter"
        )


@dataclass(frozen=True)
class SagaStart:
    """The request to run a saga for a piece of the domain (an order): the saga's id, the
    id of what it serves, and its payload (primitives only)."""

    saga_id: UUID
    order_id: UUID
    payload: Mapping[str, Any]
