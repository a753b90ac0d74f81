"""The HTTP API: ``create_app()`` builds a Flask app; the entry point supplies the saga starter."""

from __future__ import annotations

from flask import Flask, Response, json
from sqlalchemy import Engine, text

from config.database import make_engine
from config.logs import clear_log_context
from config.redis_client import connect
from config.settings import Settings, load_settings
from orders.api.admin import admin_blueprint
from orders.api.admission import install_admission
from orders.api.health import health_blueprint
from orders.api.limits import install_rate_limit
from orders.api.metrics import instrument
from orders.api.openapi import openapi_document
from orders.api.problems import register_error_handlers
from orders.api.routes import customers_blueprint, orders_blueprint
from orders.api.timeline import timeline_blueprint
from orders.api.webhooks import webhooks_blueprint
from orders.cache import Caches
from orders.ports import Operations, SagaCanceller, SagaStarter, TimelineSource
from orders.reads import Reader

#: Seconds a readiness probe waits for the database or Redis.
READY_TIMEOUT = 0.5


def create_app(
    settings: Settings | None = None,
    *,
    starter: SagaStarter,
    engine: Engine | None = None,
    timeline: TimelineSource | None = None,
    operations: Operations | None = None,
    caches: Caches | None = None,
    canceller: SagaCanceller | None = None,
    refunds: SagaStarter | None = None,
) -> Flask:
    """Build the API. ``starter`` dispatches sagas; ``canceller`` and ``refunds``
    (optional, together) serve the cancel and refund endpoints; ``timeline`` (optional)
    reads saga timelines; ``operations`` (optional) serves the operators' endpoints; ``engine``
    defaults to a new one."""
    settings = settings or load_settings()
    engine = engine or make_engine(settings, application_name="orders-api")
    app = Flask(__name__)
    # Never the debugger. Bodies past the limit are refused with 413: by Content-Length
    # before reading, or after reading one byte too many (see bodies.read_json).
    app.config.update(DEBUG=False, MAX_CONTENT_LENGTH=settings.max_body_bytes + 1)
    register_error_handlers(app)
    instrument(app)
    install_rate_limit(app, settings)  # before authentication: no database lookup
    install_admission(app, settings)  # after the rate limit, before PostgreSQL

    @app.teardown_request
    def forget_log_context(exc: BaseException | None) -> None:
        clear_log_context()

    redis = connect(
        settings.broker_url,
        settings.sentinel,
        socket_timeout=READY_TIMEOUT,
        socket_connect_timeout=READY_TIMEOUT,
    )

    def database() -> None:
        with engine.connect() as conn:
            conn.execute(text("SET LOCAL statement_timeout = 500"))
            conn.execute(text("SELECT 1"))

    def broker() -> None:
        redis.ping()

    app.register_blueprint(health_blueprint({"database": database, "redis": broker}))
    reader = Reader(engine, caches)
    app.register_blueprint(
        orders_blueprint(settings, engine, starter, reader, canceller=canceller, refunds=refunds)
    )
    app.register_blueprint(customers_blueprint(settings, engine, reader))
    app.register_blueprint(webhooks_blueprint(settings, engine))
    if timeline is not None:
        app.register_blueprint(timeline_blueprint(settings, engine, timeline, reader))
    if operations is not None:
        app.register_blueprint(admin_blueprint(settings, engine, operations))
    spec = json.dumps(openapi_document(settings))

    @app.get("/openapi.json")
    def openapi() -> Response:
        return Response(spec, mimetype="application/json")

    return app
