"""Liveness (``/healthz``) and readiness (``/readyz``: database and Redis reachable)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from flask import Blueprint, Response, json

from orders.api.problems import problem

logger = logging.getLogger(__name__)

#: A readiness check: raises when its dependency cannot be reached.
Check = Callable[[], None]


def health_blueprint(checks: Mapping[str, Check]) -> Blueprint:
    """``/healthz`` answers while the process runs; ``/readyz`` runs every check."""
    bp = Blueprint("health", __name__)

    @bp.get("/healthz")
    def healthz() -> Response:
        return Response(json.dumps({"status": "ok"}), mimetype="application/json")

    @bp.get("/readyz")
    def readyz() -> Response:
        failed = {}
        for name, check in checks.items():
            try:
                check()
            except Exception as exc:
                logger.warning("readiness check %s failed: %r", name, exc)
                failed[name] = type(exc).__name__
        if failed:
            response = problem(503, "Not ready", "dependencies unreachable", failed=failed)
            response.headers["Retry-After"] = "5"
            return response
        body = {"status": "ready", "checks": sorted(checks)}
        return Response(json.dumps(body), mimetype="application/json")

    return bp
