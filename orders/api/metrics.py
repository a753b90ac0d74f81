"""The API's Prometheus metrics: requests and their latency, by route and status.

Every label takes a bounded set of values, whatever clients send: the route is the
matched rule's pattern (``unmatched`` for none), the method one of the standard ones
(``other`` for any made-up one), the status a code HTTP defines (``other`` for the
rest). A label value per client-chosen string would grow ``/metrics`` without bound.

Under gunicorn (several processes) the values live in PROMETHEUS_MULTIPROC_DIR (set up by
config/gunicorn.py) and ``/metrics`` adds up every process; otherwise, in this process.
"""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from werkzeug.http import HTTP_STATUS_CODES

#: Methods counted under their own name; any other is counted as ``other``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "orders_api_requests_total", "HTTP requests answered.", ["route", "method", "status"]
)
LATENCY = Histogram(
    "orders_api_request_duration_seconds",
    "Time to answer a request.",
    ["route", "method"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


def instrument(app: Flask) -> None:
    """Count and time every request; serve ``/metrics``."""

    @app.before_request
    def start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def observe(response: Response) -> Response:
        started = g.pop("request_started", None)
        if started is not None:
            route = request.url_rule.rule if request.url_rule else "unmatched"
            method = request.method if request.method in METHODS else "other"
            code = response.status_code
            status = str(code) if code in HTTP_STATUS_CODES else "other"
            REQUESTS.labels(route, method, status).inc()
            LATENCY.labels(route, method).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        registry = REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        # The type as prometheus_client names it, charset included: as a mimetype,
        # Flask would add a second charset.
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
