"""Saga definitions: which steps run in parallel, by which task names. Pure data.

Where the tasks travel is the routes' business (config.names), not the definition's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class Step:
    """One step: its ledger name and the Celery task (by name) that performs it."""

    name: str
    task: str


@dataclass(frozen=True)
class SagaDefinition:
    """Steps run in parallel, then one completion task decides."""

    name: str
    steps: tuple[Step, ...]
    #: The task that confirms or compensates once every step has an outcome.
    complete_task: str

    def __post_init__(self) -> None:
        """Refuse a definition with no step or a step named twice."""
        names = [step.name for step in self.steps]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"saga {self.name!r} needs distinct steps, got {names}")

    @property
    def step_names(self) -> tuple[str, ...]:
        """The steps' names, in declaration order."""
        return tuple(step.name for step in self.steps)


@dataclass(frozen=True)
class SagaStart:
    """The request to run a saga for a piece of the domain (an order): the saga's id, the
    id of what it serves, and its payload (primitives only)."""

    saga_id: UUID
    order_id: UUID
    payload: Mapping[str, Any]
