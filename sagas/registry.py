"""The sagas a process knows: their handlers by (name, version).

Several versions of one saga may be deployed side by side: a saga runs to its end on
the version it started on, and new ones start on the latest. A task name belongs to one
saga name (its versions may share it), so that a step's message finds its saga by the
task it names and its handlers by the version it carries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sagas.definition import SagaDefinition, Step, UnknownSagaVersion
from sagas.runner import SagaHandlers

__all__ = ["SagaRegistry", "UnknownSagaVersion"]


class SagaRegistry:
    """Handlers by saga name and version."""

    def __init__(self, handlers: Iterable[SagaHandlers] = ()) -> None:
        self._by_name: dict[str, dict[int, SagaHandlers]] = {}
        #: Step task name -> saga name.
        self._task_saga: dict[str, str] = {}
        for each in handlers:
            self.add(each)

    def add(self, handlers: SagaHandlers) -> None:
        """Know one more saga version. Refused: a (name, version) added twice, a task
        name used by two steps of one version or by two saga names, and a version whose
        completion task differs from its saga's other versions."""
        definition = handlers.definition
        versions = self._by_name.setdefault(definition.name, {})
        if definition.version in versions:
            raise ValueError(f"saga {definition.name!r} version {definition.version} twice")
        tasks = [step.task for step in definition.steps]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"saga {definition.name!r}: a task name serves two steps")
        for task in tasks:
            owner = self._task_saga.get(task, definition.name)
            if owner != definition.name:
                raise ValueError(f"task {task!r} belongs to saga {owner!r}, not to both")
        others = {each.definition.complete_task for each in versions.values()}
        if others and others != {definition.complete_task}:
            raise ValueError(f"saga {definition.name!r}: one completion task for all versions")
        versions[definition.version] = handlers
        self._task_saga.update(dict.fromkeys(tasks, definition.name))

    def get(self, name: str, version: int = 1) -> SagaHandlers:
        """The handlers of that saga version (UnknownSagaVersion if not here)."""
        try:
            return self._by_name[name][version]
        except KeyError:
            raise UnknownSagaVersion(name, version, self.versions(name)) from None

    def definition(self, name: str, version: int = 1) -> SagaDefinition:
        """The definition of that saga version (UnknownSagaVersion if not here)."""
        return self.get(name, version).definition

    def latest(self, name: str) -> SagaHandlers:
        """The handlers of the saga's latest version here: new sagas start on it."""
        versions = self.versions(name)
        if not versions:
            raise UnknownSagaVersion(name, 1)
        return self._by_name[name][versions[-1]]

    def versions(self, name: str) -> tuple[int, ...]:
        """The versions of the saga known here, lowest first."""
        return tuple(sorted(self._by_name.get(name, {})))

    def names(self) -> tuple[str, ...]:
        """The sagas known here, by name."""
        return tuple(name for name, versions in self._by_name.items() if versions)

    def definitions(self) -> list[SagaDefinition]:
        """Every (name, version) definition known here."""
        return [handlers.definition for handlers in self]

    def saga_of_task(self, task: str) -> str | None:
        """The saga name whose steps the task performs, if any."""
        return self._task_saga.get(task)

    def step_tasks(self) -> dict[str, str]:
        """Every step task name known here -> its saga name."""
        return dict(self._task_saga)

    def step(self, task: str, version: int = 1) -> tuple[SagaHandlers, Step]:
        """The handlers and the step that a step task's message of ``version`` runs
        (UnknownSagaVersion if that version is not here, LookupError if the version
        has no step of that task)."""
        name = self._task_saga.get(task)
        if name is None:
            raise LookupError(f"task {task!r} is no step of a saga known here")
        handlers = self.get(name, version)
        step = handlers.definition.step_of_task(task)
        if step is None:
            raise LookupError(f"saga {name!r} version {version} has no step run by {task!r}")
        return handlers, step

    def __iter__(self) -> Iterator[SagaHandlers]:
        """Every saga version's handlers, by name then version."""
        for versions in self._by_name.values():
            for version in sorted(versions):
                yield versions[version]

    def __len__(self) -> int:
        """How many saga versions are known here."""
        return sum(len(versions) for versions in self._by_name.values())
