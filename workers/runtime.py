"""What a worker process holds: its settings and its own database engine."""

from __future__ import annotations

import os

from sqlalchemy import Engine

from config.settings import Settings
from orders.db import make_engine
from sagas.order import OrderSaga


class Runtime:
    """Per-process resources, created on first use in the process that uses them.

    A prefork child inherits its parent's memory; the engine is keyed by process id, so
    each child builds its own after the fork and never reuses a socket of the parent."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.order_saga = OrderSaga()
        self._engine: Engine | None = None
        self._pid = 0

    @property
    def engine(self) -> Engine:
        """This process's engine."""
        if self._engine is None or self._pid != os.getpid():
            self._engine = make_engine(self.settings, application_name="orders-worker")
            self._pid = os.getpid()
        return self._engine
