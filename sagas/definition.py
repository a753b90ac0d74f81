"""Saga definitions: which steps run in parallel, by which task names. Pure data.

Where the tasks travel is the routes' business (config.names), not the definition's.
"""

from __future__ import annotations

from dataclasses import dataclass


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
