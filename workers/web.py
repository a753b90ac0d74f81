"""Entry point of the API process: ``gunicorn 'workers.web:create_app()'``.

Composes the HTTP API (``orders.api``) with its ports: the saga launcher
(``sagas.launch``, publishing chords through a publisher-only Celery app), the saga
timeline (``sagas.timeline``) and the operators' tools (``workers.admin``)."""

from __future__ import annotations

from datetime import timedelta

from flask import Flask

from config import tracing
from config.logs import configure_logging
from config.settings import load_settings
from orders import api
from orders.cache import Caches
from orders.db import make_engine
from sagas.launch import ChordLauncher
from sagas.order import DEFINITIONS, ORDER_SAGA
from sagas.timeline import SqlTimeline
from workers.admin import Operations
from workers.celery_app import create_celery


def create_app() -> Flask:
    """Build the API with its saga launcher, from the environment."""
    settings = load_settings()
    configure_logging(settings)
    # Once per gunicorn worker (no preload: this runs after the fork); off by default.
    tracing.install_provider(settings, "orders-api")
    engine = make_engine(settings, application_name="orders-api")
    publisher = create_celery(settings, publisher=True)
    deadline = timedelta(seconds=settings.saga_deadline_seconds)
    launcher = ChordLauncher(engine, publisher, ORDER_SAGA, deadline)
    operations = Operations(engine, publisher, settings, DEFINITIONS)
    caches = (
        Caches(
            settings.cache_url,
            timeout=settings.cache_timeout_seconds,
            sentinel=settings.sentinel,
        )
        if settings.cache_url
        else None
    )
    app = api.create_app(
        settings,
        starter=launcher,
        engine=engine,
        caches=caches,
        timeline=SqlTimeline(engine),
        operations=operations,
    )
    tracing.instrument_flask(app)
    return app
