"""Traces are off unless an OTLP endpoint or a traces file is set, and then cost nothing;
on, a trace starts only at a request or a task."""

from __future__ import annotations

from flask import Flask
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import SpanKind

from config import tracing
from config.settings import load_settings

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_without_an_endpoint_or_a_file_nothing_is_installed() -> None:
    settings = load_settings({"APP_ENV": "test"})
    assert not tracing.enabled(settings)

    assert not tracing.instrument(settings)
    tracing.install_provider(settings, "orders-api")
    app = Flask(__name__)
    wsgi = app.wsgi_app
    tracing.instrument_flask(app)

    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert not CeleryInstrumentor().is_instrumented_by_opentelemetry
    assert not RedisInstrumentor().is_instrumented_by_opentelemetry
    assert app.wsgi_app == wsgi and not app.before_request_funcs
    assert tracing.current_traceparent() is None
    with tracing.resumed(TRACEPARENT, "outbox relay"):
        assert not trace.get_current_span().get_span_context().is_valid


def test_an_endpoint_or_a_file_turns_traces_on_and_the_sdk_switch_off() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing.enabled(load_settings(endpoint))
    assert tracing.enabled(load_settings({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/v1"}))
    assert tracing.enabled(load_settings({"TRACES_FILE": "/tmp/spans.jsonl"}))
    assert not tracing.enabled(load_settings({**endpoint, "OTEL_SDK_DISABLED": "TRUE"}))


def test_a_trace_id_is_read_from_a_traceparent() -> None:
    assert tracing.trace_id_of(TRACEPARENT) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.trace_id_of(None) is None
    assert tracing.trace_id_of("garbage") is None


def test_a_trace_starts_at_a_request_or_a_task_but_not_at_a_polling_loop() -> None:
    sampler = tracing._sampler(frozenset({"run/housekeeping.relay_outbox"}))

    def decision(name: str, kind: SpanKind) -> Decision:
        return sampler.should_sample(None, 1, name, kind).decision

    assert decision("POST /orders", SpanKind.SERVER) is Decision.RECORD_AND_SAMPLE
    assert decision("run/saga.order.reserve_stock", SpanKind.CONSUMER).is_sampled()
    assert decision("run/housekeeping.relay_outbox", SpanKind.CONSUMER) is Decision.DROP
    assert decision("BRPOP", SpanKind.CLIENT) is Decision.DROP  # the broker's polling
    assert decision("apply_async/housekeeping.sweep_sagas", SpanKind.PRODUCER) is Decision.DROP
