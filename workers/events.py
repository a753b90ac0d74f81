"""The event consumers' process: ``python -m workers.events`` (Procfile ``events``).

Applies new order events to the caches and to the customer order summaries, a batch at a
time, each consumer in its own transactions (one failing does not hold the other up).
One process per deployment is enough; a second one idles (a consumer's checkpoint row is
locked while it works) and takes over when the first stops. Beat runs the integrity
check (``housekeeping.check_events``, on the housekeeping lane) for what the feed missed.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # One process: its metrics are plain, whatever directory the environment names for
    # the multiprocess ones of the other processes.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

import logging
import signal
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from prometheus_client import Gauge, start_http_server
from sqlalchemy import Engine

from config import gc_tuning
from config.database import make_engine
from config.logs import configure_logging
from config.settings import Settings, load_settings
from orders.cache import Caches
from orders.events import Consumer, consume, lag, newest
from orders.projections import event_consumers

logger = logging.getLogger(__name__)

#: Events read per transaction.
BATCH = 500

LAG = Gauge("orders_consumer_lag_events", "Events written but not yet applied.", ["consumer"])


def run(settings: Settings, engine: Engine, consumers: Sequence[Consumer], stop: Any) -> None:
    """Consume until ``stop`` (a threading.Event) is set."""
    failing: dict[str, float] = {}
    #: Each consumer's checkpoint after its last pass: a consumer already at the newest
    #: event is not given a transaction.
    reached: dict[str, int] = {}
    #: Per consumer, when it first saw each event it is holding back (see ``consume``).
    seen: dict[str, dict[int, datetime]] = {consumer.name: {} for consumer in consumers}
    measured = 0.0
    while not stop.is_set():
        busy = applied = False
        try:
            last = newest(engine)
        except Exception as exc:
            logger.warning("events not read, trying again in 1 s: %r", exc)
            stop.wait(1.0)
            continue
        for consumer in consumers:
            if failing.get(consumer.name, 0.0) > time.monotonic():
                continue
            if reached.get(consumer.name, -1) >= last:
                continue
            try:
                tally = consume(
                    engine,
                    consumer,
                    limit=BATCH,
                    hold=settings.events_hold_seconds,
                    seen=seen[consumer.name],
                )
            except Exception as exc:
                logger.warning("consumer %s failed, trying again in 1 s: %r", consumer.name, exc)
                failing[consumer.name] = time.monotonic() + 1.0
                continue
            failing.pop(consumer.name, None)
            if tally.checkpoint is None:
                continue
            # A full batch that moved the checkpoint: more is waiting, read on at once.
            # (A full batch held behind a hole is read again after the poll interval.)
            moved = tally.checkpoint != reached.get(consumer.name)
            reached[consumer.name] = tally.checkpoint
            busy = busy or (tally.read >= BATCH and moved)
            applied = applied or moved
        if time.monotonic() - measured > 1.0:
            measured = time.monotonic()
            for consumer in consumers:
                try:
                    LAG.labels(consumer.name).set(lag(engine, consumer.name))
                except Exception:
                    logger.debug("lag not measured", exc_info=True)
        if not busy:
            # Events came in: more are likely on the way, let them gather into the next
            # pass. None: look again soon, so that a lone event is applied at once.
            stop.wait(settings.events_batch_seconds if applied else settings.events_poll_seconds)


def main() -> None:
    """Run the consumers until SIGTERM or SIGINT."""
    settings = load_settings()
    configure_logging(settings)
    if settings.events_metrics_port:
        start_http_server(settings.events_metrics_port, addr=settings.worker_metrics_bind)
    engine = make_engine(settings, application_name="orders-events")
    caches = (
        Caches(
            settings.cache_url,
            timeout=settings.cache_timeout_seconds,
            sentinel=settings.sentinel,
        )
        if settings.cache_url
        else None
    )
    if caches is not None and (warning := caches.eviction_warning()) is not None:
        logger.warning("%s", warning)
    consumers = event_consumers(caches)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    logger.info("event consumers running: %s", ", ".join(c.name for c in consumers))
    gc_tuning.freeze()
    gc_tuning.watch()
    run(settings, engine, consumers, stop)
    engine.dispose()


if __name__ == "__main__":
    main()
