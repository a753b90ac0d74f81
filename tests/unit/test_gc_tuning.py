"""Long-running processes freeze what startup built and log slow garbage collections."""

from __future__ import annotations

import gc
import logging

import pytest

from config import gc_tuning


def test_freeze_moves_what_is_alive_out_of_the_collectors_way() -> None:
    try:
        gc_tuning.freeze()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_a_slow_collection_is_logged_once_per_collection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(gc_tuning, "SLOW_SECONDS", -1.0)  # every collection is "slow"
    before = list(gc.callbacks)
    try:
        gc_tuning.watch()
        gc_tuning.watch()
        assert gc.callbacks.count(gc_tuning._time) == 1
        with caplog.at_level(logging.WARNING, logger="config.gc_tuning"):
            gc.collect(2)
        assert any("generation 2" in r.getMessage() for r in caplog.records)
    finally:
        gc.callbacks[:] = before
