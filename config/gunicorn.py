"""gunicorn settings for the API.

gunicorn -c python:config.gunicorn 'workers.web:create_app()'
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from config.logs import gunicorn_logconfig
from config.settings import load_settings

_settings = load_settings()

#: Loopback unless told otherwise (API_BIND=0.0.0.0 in a container).
bind = f"{os.environ.get('API_BIND', '127.0.0.1')}:{os.environ.get('API_PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
#: gevent (default): each connection is a greenlet, so clients sending their headers or
#: body slowly cannot take every thread and stall the API (docs/performance.md); gthread
#: is the fallback. Both answer gunicorn's own errors as problem+json.
_WORKER_CLASSES = {
    "gevent": "config.gunicorn_worker.GeventWorker",
    "gthread": "config.gunicorn_worker.ThreadWorker",
}
worker_class = _WORKER_CLASSES[os.environ.get("WEB_WORKER", "gevent")]
#: Connections one gevent worker serves at once (a slow one costs a greenlet).
worker_connections = int(os.environ.get("WEB_CONNECTIONS", "1000"))
#: Threads of a gthread worker.
threads = int(os.environ.get("WEB_THREADS", "4"))
#: A request that runs past this is killed; the client sees a dropped connection.
timeout = 30
graceful_timeout = 10
#: Recycle workers now and then (with jitter, so not all at once).
max_requests = 20000
max_requests_jitter = 2000
#: No --preload: each worker builds its own app, engine and broker connections.
preload_app = False
errorlog = "-"
#: Under LOG_FORMAT=json, gunicorn's own lines are JSON records as the API's are (no
#: access log: the API counts and times requests in /metrics).
logconfig_dict = gunicorn_logconfig(_settings)
if _settings.log_format == "json":
    logging.captureWarnings(True)  # the master's warnings (gevent's, say) as records
#: No control socket: by default every gunicorn of a user shares one path
#: (~/.gunicorn/gunicorn.ctl), so one instance's would answer for another's.
control_socket_disable = True
loglevel = _settings.log_level.lower()


def on_starting(server: object) -> None:
    """Before the workers fork: a fresh directory for their Prometheus metrics, so that
    /metrics adds up every worker (prometheus_client's multiprocess mode)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="orders-api-metrics-")


def post_worker_init(worker: object) -> None:
    """The worker built its app: the collector skips what that made from now on, and
    slow collections are logged (config.gc_tuning)."""
    from config import gc_tuning

    gc_tuning.freeze()
    gc_tuning.watch()


def child_exit(server: object, worker: object) -> None:
    """A worker went away: its live gauges no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined,no-untyped-call]
