"""The API's gunicorn workers: gunicorn's own error answers as RFC 9457 problem details.

``GeventWorker`` (the default, see ``config/gunicorn.py``) serves each connection in a
greenlet, so a client that sends its headers or body slowly holds a greenlet, not one of
a handful of threads; psycopg2 is made cooperative (psycogreen) so a query waits without
blocking the other greenlets. ``ThreadWorker`` is gunicorn's gthread worker, kept as a
fallback (``WEB_WORKER=gthread``).

Both answer the requests gunicorn itself refuses before the application sees them (request
line too long: 414, header fields too large or too many: 431, a malformed request: 400)
with ``application/problem+json`` instead of gunicorn's HTML page. gunicorn picks the
status, logs the request and then calls ``gunicorn.util.write_error``; the worker process
replaces that one function, so gunicorn's classification stays its own.
"""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util  # type: ignore[import-untyped]
from gunicorn.workers.ggevent import GeventWorker as _GeventWorker  # type: ignore[import-untyped]
from gunicorn.workers.gthread import ThreadWorker as _ThreadWorker  # type: ignore[import-untyped]

PROBLEM_JSON = "application/problem+json"
#: gunicorn's message may quote the offending request line: no more of it than this.
MAX_DETAIL = 200


def problem_response(status: int, reason: str, detail: str) -> bytes:
    """The bytes of a complete problem-details answer that closes the connection."""
    problem: dict[str, Any] = {"type": "about:blank", "title": reason, "status": status}
    if detail:
        problem["detail"] = detail[:MAX_DETAIL]
    body = json.dumps(problem).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        f"Content-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_problem(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """``gunicorn.util.write_error`` with the same arguments, answering problem+json."""
    util.write_nonblock(sock, problem_response(status_int, reason, mesg))


class ProblemErrors:
    """Mixin for a gunicorn worker: its own error answers are problem details."""

    def init_process(self) -> None:
        # gunicorn's workers call util.write_error by attribute, at the time of the error.
        util.write_error = write_problem
        super().init_process()  # type: ignore[misc]


class GeventWorker(ProblemErrors, _GeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker, with psycopg2 cooperative and problem+json errors."""

    def patch(self) -> None:
        """gevent's monkey patching (sockets, threads, locks...) and psycopg2's wait
        callback, before the application (and its engine) is built."""
        super().patch()
        from psycogreen.gevent import patch_psycopg  # type: ignore[import-untyped]

        patch_psycopg()


class ThreadWorker(ProblemErrors, _ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker with problem+json errors."""
