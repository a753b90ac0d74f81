"""Entry point of the Celery processes: ``celery -A workers.app worker|beat|flower``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def use_multiprocess_metrics() -> None:
    """Give this process tree a fresh PROMETHEUS_MULTIPROC_DIR before any of our metrics
    exist: the pool children write their metrics there and the main process serves them
    added up."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        Path(directory).mkdir(parents=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="orders-metrics-")
    # The celery command loads Flower's plugin, which imports prometheus_client before
    # this module runs; the mode it chose then (one process) is chosen again now.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


use_multiprocess_metrics()

from workers.celery_app import create_celery  # noqa: E402

app = create_celery()
