"""The Celery app factory."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import setup_logging

from config.celeryconf import celery_config
from config.logs import configure_logging
from config.settings import Settings, load_settings
from workers.compat import apply_fixes
from workers.runtime import Runtime
from workers.tasks import register_tasks


def create_celery(settings: Settings | None = None, *, publisher: bool = False) -> Celery:
    """Build the Celery app. A ``publisher`` (the API) only sends messages: it registers
    no task and waits at most ``dispatch_timeout_seconds`` for the broker."""
    settings = settings or load_settings()
    config = celery_config(settings)
    if publisher:
        timeout = settings.dispatch_timeout_seconds
        config["broker_transport_options"] = {
            **config["broker_transport_options"],
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        config["result_backend_transport_options"] = {
            **config["result_backend_transport_options"],
            # The chord's size is written to the backend before the steps are sent: give
            # up at the first error too, and let the outbox relay dispatch later.
            "retry_policy": {"max_retries": 0},
        }
        config["redis_socket_timeout"] = timeout
        config["redis_socket_connect_timeout"] = timeout
    app = Celery("orders", set_as_current=False)
    app.config_from_object(config)
    if not publisher:
        apply_fixes()
        register_tasks(app, Runtime(settings))

        def _logging(**_: Any) -> None:
            configure_logging(settings)

        # Connected, this signal keeps Celery from installing its own log handlers.
        setup_logging.connect(_logging, weak=False)
    return app
