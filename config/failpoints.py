"""Failpoints: named places in the code where a test can make the process crash.

Armed through the environment, never in production::

    FAILPOINTS="step.after_commit=kill*1,complete.before_commit=raise"
    FAILPOINTS_DIR=/tmp/run/failpoints     # where "*N" counts survive the crash

Actions: ``kill`` (SIGKILL this process), ``exit`` (exit at once, no cleanup), ``raise``
(FailpointError), ``sleep:SECONDS``. ``*N`` fires the first N times across every process
sharing FAILPOINTS_DIR, then the failpoint is inert; without it, it fires every time.
``name@key=action`` arms the point only where the code passes that key (a chunk's
number, say).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Every failpoint in the code, with the crash window it opens.
KNOWN = {
    "api.after_commit": "the order is committed, its saga not yet published",
    "launch.after_publish": "the chord is published, the outbox entry not yet cleared",
    "relay.after_publish": "the relay published, its claim not yet committed",
    "step.before_commit": "a step's effect is made, its transaction not yet committed",
    "step.after_commit": "a step's effect is committed, its message not yet acknowledged",
    "complete.before_commit": "the decision is made, its transaction not yet committed",
    "complete.after_commit": "the saga is decided, its message not yet acknowledged",
    "advance.before_commit": "the next stage is decided, its transaction not yet committed",
    "advance.after_commit": "the saga moved on to its next stage, not yet published",
    "compensate.release": "a compensation is about to release a reservation",
    "credit_check.chunk": "a chunk of a credit check runs (key: the chunk's number)",
    "batch.publish": "a batch run publishes its chunks (key: the number of the next one)",
}


class FailpointError(RuntimeError):
    """Raised by a failpoint armed with ``raise``."""


@dataclass(frozen=True)
class _Armed:
    action: str
    count: int | None


_armed: dict[str, _Armed] | None = None


def _parse(spec: str) -> dict[str, _Armed]:
    armed = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        base = name.partition("@")[0]
        action, _, count = action.partition("*")
        if base not in KNOWN:
            raise ValueError(f"unknown failpoint {base!r}; known: {', '.join(KNOWN)}")
        armed[name] = _Armed(action or "kill", int(count) if count else None)
    return armed


def _load() -> dict[str, _Armed]:
    global _armed
    if _armed is None:
        inert = os.environ.get("APP_ENV") == "production"
        _armed = {} if inert else _parse(os.environ.get("FAILPOINTS", ""))
    return _armed


def _take_turn(name: str, count: int) -> bool:
    """Whether this firing is one of the first ``count`` (a marker file per firing)."""
    folder = Path(os.environ.get("FAILPOINTS_DIR") or Path(tempfile.gettempdir(), "failpoints"))
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        try:
            os.close(os.open(folder / f"{name}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            continue
    return False


def failpoint(name: str, key: object = None) -> None:
    """Crash here if a test armed ``name`` (or ``name@key``); do nothing otherwise
    (always nothing in production)."""
    points = _load()
    armed = points.get(f"{name}@{key}") if key is not None else None
    armed = armed or points.get(name)
    if armed is None or (armed.count is not None and not _take_turn(name, armed.count)):
        return
    action = armed.action
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(70)
    elif action == "raise":
        raise FailpointError(f"failpoint {name}")
    elif action.startswith("sleep:"):
        time.sleep(float(action.removeprefix("sleep:")))
    else:
        raise ValueError(f"failpoint {name}: unknown action {action!r}")
