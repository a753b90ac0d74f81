"""Entry point of the API process: ``gunicorn 'workers.web:create_app()'``.

Composes the HTTP API (``orders.api``) with its ports: the saga launchers of orders and
refunds (``sagas.launch``, publishing chords through a publisher-only Celery app; new
sagas start on the latest version of the registry, ``workers.runtime.saga_registry``), the
canceller of running order sagas (``sagas.runner``), the saga timeline
(``orders.saga_timeline``) and the operators' tools (``workers.admin``)."""

from __future__ import annotations

from datetime import timedelta

from flask import Flask

from config import tracing
from config.database import make_engine
from config.logs import configure_logging
from config.settings import load_settings
from orders import api
from orders.cache import CREDIT, Caches
from orders.credit import CreditFigures
from orders.projections import credit_entry
from orders.refund_saga import REFUND_SAGA
from orders.saga import ORDER_SAGA
from orders.saga_timeline import SqlTimeline
from sagas.launch import ChordLauncher
from sagas.runner import RunningSagaCanceller
from workers.admin import Operations
from workers.celery_app import create_celery
from workers.escalation import escalation
from workers.runtime import recovery_policy, saga_registry


def create_app() -> Flask:
    """Build the API with its saga launcher, from the environment."""
    settings = load_settings()
    configure_logging(settings)
    # Once per gunicorn worker (no preload: this runs after the fork); off by default.
    tracing.install_provider(settings, "orders-api")
    engine = make_engine(settings, application_name="orders-api")
    publisher = create_celery(settings, publisher=True)
    caches = (
        Caches(
            settings.cache_url,
            timeout=settings.cache_timeout_seconds,
            sentinel=settings.sentinel,
        )
        if settings.cache_url
        else None
    )

    def credit_changed(figures: CreditFigures) -> None:
        if caches is not None:
            caches.put(CREDIT, {figures.customer_id: credit_entry(figures)})

    sagas = saga_registry(settings, on_credit=credit_changed)
    deadline = timedelta(seconds=settings.saga_deadline_seconds)
    # New sagas start on the latest version this process knows.
    launcher = ChordLauncher(engine, publisher, sagas.latest(ORDER_SAGA.name).definition, deadline)
    refunds = ChordLauncher(engine, publisher, sagas.latest(REFUND_SAGA.name).definition, deadline)
    operations = Operations(engine, publisher, settings, sagas, sagas=sagas)
    # A customer's cancel decides the running order saga in the request (a refund
    # starts the refund saga as an order starts its own), on the saga's own version.
    canceller = RunningSagaCanceller(
        engine, sagas, recovery_policy(settings).compensation_wait, escalation(sagas)
    )
    app = api.create_app(
        settings,
        starter=launcher,
        engine=engine,
        caches=caches,
        timeline=SqlTimeline(engine),
        operations=operations,
        canceller=canceller,
        refunds=refunds,
    )
    tracing.instrument_flask(app)
    return app
