"""OpenTelemetry traces: one trace per order, from ``POST /orders`` through the broker to
each saga step and the completion, and to the outbox relay or the sweeper when they
dispatch the saga later.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)
or ``TRACES_FILE`` is set. Off, nothing is installed: no SDK provider, no
instrumentation, and every function here returns at once. On, each process:

- applies the instrumentations once (``instrument``): Redis (redis-py, every client),
  Celery (the task's run span, parented by the context in the message's headers), the
  publish hooks of this module (below), and, per engine, SQLAlchemy (``instrument_engine``,
  called by ``config.database.make_engine``) and Flask (``instrument_flask``);
- installs the SDK's provider once it is the process that does the work
  (``install_provider``): a gunicorn worker when it builds its app (no preload: after
  the fork), a Celery pool child before its first task (any pool: prefork, solo,
  threads); the batch span processor's thread does not survive a fork.

Traces start only where work enters: an HTTP request or a task whose message carries no
context (the sampler below); everything else (the broker's polling, the housekeeping
tasks that run every second) records nothing unless it works for one of those. The
relay and the sweeper resume the trace stored with the saga (``sagas.trace_context``,
the W3C traceparent of the request that accepted the order): see ``resumed``.

Celery's own instrumentation looks a published task up in the default app's registry;
ours are registered on apps of their own (and the API registers none), so its publish
span would never end and its context would stay attached. Its publish hooks are
replaced by ``_before_publish`` / ``_after_publish``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from config.logs import bind_log_context
from config.settings import Settings

if TYPE_CHECKING:
    from flask import Flask
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.trace import Link, Span, SpanKind, Tracer
    from opentelemetry.util.types import Attributes
    from sqlalchemy import Engine

#: Requests that are not worth a trace (probes and scrapes), as the Flask
#: instrumentation's ``excluded_urls`` (comma-separated regular expressions).
EXCLUDED_URLS = "/healthz,/readyz,/metrics"
#: Publish spans waiting for their message to be sent; past this many (publishes that
#: failed and were never finished) they are ended and forgotten.
MAX_PENDING_PUBLISHES = 1000

_on = False
_provider: TracerProvider | None = None
_provider_pid = 0
_pending: dict[str, Span] = {}
#: The run spans of the tasks beat sends every few seconds (polling loops: the relay,
#: the sweepers...): they start no trace (their work for one saga joins that saga's).
_quiet: frozenset[str] = frozenset()
_install_lock = threading.Lock()


def enabled(settings: Settings) -> bool:
    """Whether the settings ask for traces (an OTLP endpoint or a traces file)."""
    return bool(settings.otel_endpoint or settings.traces_file)


def instrument(settings: Settings, quiet_tasks: Iterable[str] = ()) -> bool:
    """Apply the Redis and Celery instrumentations and the publish hooks, once per
    process, if the settings ask for traces; whether traces are on. ``quiet_tasks``
    start no trace of their own. Call it before the Celery app connects its own task
    signals: the run span then exists when they fire."""
    global _on, _quiet
    if not enabled(settings):
        return False
    _quiet |= {f"run/{name}" for name in quiet_tasks}
    if _on:
        return True
    from celery import signals
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().instrument()
    celery = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    celery.instrument()
    signals.before_task_publish.disconnect(celery._trace_before_publish)
    signals.after_task_publish.disconnect(celery._trace_after_publish)
    signals.before_task_publish.connect(_before_publish, weak=False)
    signals.after_task_publish.connect(_after_publish, weak=False)
    _on = True
    return True


def install_provider(settings: Settings, service: str) -> None:
    """Install the SDK's tracer provider in this process (once; again in a forked
    child), exporting over OTLP and/or to the traces file. Nothing when traces are off."""
    if not enabled(settings) or _provider_pid == os.getpid():
        return
    with _install_lock:
        if _provider_pid != os.getpid():
            _install(settings, service)


def _install(settings: Settings, service: str) -> None:
    global _provider, _provider_pid
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    instrument(settings)
    # OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES, when they name the service, win.
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service}))
    provider = TracerProvider(resource=resource, sampler=_sampler(_quiet))
    if settings.otel_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The exporter reads the standard OTEL_EXPORTER_OTLP_* variables (endpoint,
        # headers, timeout, compression); OTEL_BSP_* tune the batching.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if settings.traces_file:
        provider.add_span_processor(BatchSpanProcessor(_file_exporter(settings.traces_file)))
    trace.set_tracer_provider(provider)
    _provider, _provider_pid = provider, os.getpid()


def shutdown() -> None:
    """Export what is still buffered (a process about to exit)."""
    if _provider is not None and _provider_pid == os.getpid():
        _provider.shutdown()


def instrument_flask(app: Flask) -> None:
    """Trace the app's requests (not the probes), with the trace id in their log
    context. The request span starts before any other hook of the app, so that a
    request refused early (rate limit, admission) is traced too."""
    if not _on:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    def bind(span: Span, environ: dict[str, Any]) -> None:
        _bind_trace_id(span)

    FlaskInstrumentor.instrument_app(  # type: ignore[no-untyped-call]
        app, request_hook=bind, excluded_urls=EXCLUDED_URLS, enable_commenter=False
    )
    hooks = app.before_request_funcs.setdefault(None, [])
    hooks.insert(0, hooks.pop())


def instrument_engine(engine: Engine) -> None:
    """Trace the engine's statements (each a span under the current request or task)."""
    if not _on:
        return
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

    usage = metrics.get_meter(__name__).create_up_down_counter("db.client.connections.usage")
    EngineTracer(  # type: ignore[no-untyped-call]
        trace.get_tracer("opentelemetry.instrumentation.sqlalchemy"), engine, usage
    )


def annotate(**attributes: object) -> None:
    """Put these attributes (order_id, saga_id...; None ones are left out) on the
    current span and its trace id in the log context."""
    if not _on:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes({k: str(v) for k, v in attributes.items() if v is not None})
    _bind_trace_id(span)


def current_traceparent() -> str | None:
    """The current span's context as a W3C traceparent, to be stored with what it
    started; None when there is none (or traces are off)."""
    if not _on:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) of a W3C traceparent, None if it has none."""
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) >= 4 and len(parts[1]) == 32 else None


@contextmanager
def resumed(traceparent: str | None, name: str, **attributes: object) -> Iterator[None]:
    """A span that joins the trace of ``traceparent`` (stored when the work began) for
    work done later on its behalf, linked to the span that does it now (a relay or
    sweeper run). Without a traceparent, or with traces off, nothing."""
    if not _on or not traceparent:
        yield
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    now = trace.get_current_span().get_span_context()
    links = [trace.Link(now)] if now.is_valid and now.trace_flags.sampled else None
    values = {k: str(v) for k, v in attributes.items() if v is not None}
    with _tracer().start_as_current_span(name, context=parent, links=links, attributes=values):
        yield


def _tracer() -> Tracer:
    from opentelemetry import trace

    return trace.get_tracer(__name__)


def _bind_trace_id(span: Span) -> None:
    from opentelemetry.trace import format_trace_id

    bind_log_context(trace_id=format_trace_id(span.get_span_context().trace_id))


def _before_publish(
    sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any
) -> None:
    """A message is about to be sent: its publish span, child of the current one, whose
    context goes into the message's headers (the task's run span is its child)."""
    if headers is None:
        return
    from opentelemetry import trace
    from opentelemetry.propagate import inject

    task_id = str(headers.get("id"))
    span = _tracer().start_span(
        f"apply_async/{sender}",
        kind=trace.SpanKind.PRODUCER,
        attributes={"celery.task_name": str(sender), "messaging.message.id": task_id},
    )
    inject(headers, context=trace.set_span_in_context(span))
    if not span.is_recording():
        return
    if len(_pending) >= MAX_PENDING_PUBLISHES:
        for stale in _pending.values():
            stale.end()
        _pending.clear()
    _pending[task_id] = span


def _after_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """The message was sent: its publish span ends."""
    span = _pending.pop(str((headers or {}).get("id")), None)
    if span is not None:
        span.end()


def _sampler(quiet: frozenset[str]) -> Any:
    """Parent-based: a span with a parent follows it; a root span is recorded only for a
    request or a task (not one of the ``quiet`` run spans), never for a stray Redis or
    SQL call."""
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
    )
    from opentelemetry.trace import SpanKind

    class EntryPoints(Sampler):
        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            if kind in (SpanKind.SERVER, SpanKind.CONSUMER) and name not in quiet:
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return SamplingResult(Decision.DROP)

        def get_description(self) -> str:
            return "EntryPoints"

    return ParentBased(root=EntryPoints())


def _file_exporter(path: str) -> Any:
    """An exporter appending each span as one JSON line to ``path``; every process of
    the system may append to the same file (one write per line, O_APPEND)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLinesExporter(SpanExporter):
        def __init__(self) -> None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                os.write(self._fd, (span.to_json(indent=None) + "\n").encode())
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            os.close(self._fd)

    return JsonLinesExporter()
