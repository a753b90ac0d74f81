"""Logging setup shared by every process (API, workers, beat)."""

from __future__ import annotations

import logging

from config.settings import Settings

#: One line per record, with the process id: several processes write to one terminal.
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    """Send log records to stderr at the configured level."""
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT, force=True)
