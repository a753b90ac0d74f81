"""The garbage collector of long-running processes (API workers, Celery workers).

What a process builds while it starts (modules, the app, its configuration: about
100,000 objects for a worker) lives as long as the process, yet every full collection
walks it again: ``freeze`` moves it to the collector's permanent generation, so a full
collection walks only what the process made since (``gc.freeze``, the remedy the
documentation of ``gc`` gives for forking servers; it also keeps a forked child from
writing to the pages it shares with its parent when the collector marks them).

``watch`` logs every collection that holds the process up for longer than
``SLOW_SECONDS``: a pause there is a pause of every task or request in that process.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

#: A collection longer than this is logged.
SLOW_SECONDS = 0.05

_started: list[float] = []


def freeze() -> None:
    """Collect once, then move every object alive to the permanent generation."""
    gc.collect()
    gc.freeze()


def _time(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[:] = [time.perf_counter()]
        return
    if not _started:
        return
    took = time.perf_counter() - _started[0]
    if took > SLOW_SECONDS:
        logger.warning(
            "a garbage collection (generation %s) held this process up for %.3f s",
            info.get("generation"),
            took,
        )


def watch() -> None:
    """Log slow collections of this process (once per process)."""
    if _time not in gc.callbacks:
        gc.callbacks.append(_time)
