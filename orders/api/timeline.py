"""The saga timeline: ``/orders/<id>/timeline`` (JSON) and ``/orders/<id>/timeline.html``
(one bar per step on a time axis, so the parallel reservations and the waits show)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from html import escape
from uuid import UUID

from flask import Blueprint, Response
from sqlalchemy import Engine
from werkzeug.exceptions import NotFound

from config.settings import Settings
from orders.api.auth import may_see, require_key
from orders.ports import SagaTimeline, TimelineSource
from orders.reads import Reader

#: Pixels of the time axis, and of the label column left of it.
AXIS_WIDTH, LABEL_WIDTH, ROW_HEIGHT = 640, 190, 34
COLOURS = {
    "APPLIED": "#2e7d32",
    "REFUSED": "#ef6c00",
    "ABORTED": "#757575",
    "COMPENSATED": "#6a1b9a",
    "queue": "#90a4ae",
    "decision": "#1565c0",
}


@dataclass(frozen=True)
class Bar:
    """One bar: what, from and to (ms after acceptance), its colour key and a note."""

    name: str
    start_ms: float
    end_ms: float
    kind: str
    note: str


def _ms(moment: datetime, origin: datetime) -> float:
    return (moment - origin).total_seconds() * 1000


def bars(timeline: SagaTimeline) -> list[Bar]:
    """The timeline as bars: queueing, each step, the decision."""
    origin = timeline.accepted_at
    found: list[Bar] = []
    if timeline.steps:
        first = min(step.started_at for step in timeline.steps)
        found.append(
            Bar(
                "waiting for a worker",
                0.0,
                _ms(first, origin),
                "queue",
                "from acceptance to the first step",
            )
        )
    for step in timeline.steps:
        note = step.outcome + (f" ({step.reason})" if step.reason else "")
        note += f", {step.attempts} attempt{'s' if step.attempts != 1 else ''}"
        found.append(
            Bar(
                step.name,
                _ms(step.started_at, origin),
                _ms(step.finished_at, origin),
                step.outcome,
                note,
            )
        )
    if timeline.finished_at is not None and timeline.steps:
        last = max(step.finished_at for step in timeline.steps)
        found.append(
            Bar(
                "decision",
                _ms(last, origin),
                _ms(timeline.finished_at, origin),
                "decision",
                timeline.state + (f" ({timeline.reason})" if timeline.reason else ""),
            )
        )
    return found


def timeline_json(timeline: SagaTimeline) -> dict[str, object]:
    """The timeline as a JSON document."""
    return {
        "order_id": str(timeline.order_id),
        "saga_id": str(timeline.saga_id),
        "state": timeline.state,
        "reason": timeline.reason,
        "accepted_at": timeline.accepted_at.isoformat(),
        "finished_at": timeline.finished_at.isoformat() if timeline.finished_at else None,
        "steps": [
            {
                "step": step.name,
                "started_at": step.started_at.isoformat(),
                "finished_at": step.finished_at.isoformat(),
                "duration_ms": round(_ms(step.finished_at, step.started_at), 3),
                "outcome": step.outcome,
                "reason": step.reason,
                "attempts": step.attempts,
            }
            for step in timeline.steps
        ],
        "trace_id": timeline.trace_id,
        "refund": _refund_json(timeline.refund) if timeline.refund else None,
    }


def _refund_json(refund: SagaTimeline) -> dict[str, object]:
    """The refund saga's part of the timeline (its order is the timeline's)."""
    whole = timeline_json(refund)
    return {
        name: whole[name]
        for name in ("saga_id", "state", "reason", "accepted_at", "finished_at", "steps")
    }


def render_html(timeline: SagaTimeline) -> str:
    """A page with the timeline drawn as SVG bars on a time axis (no script)."""
    drawn = bars(timeline)
    span = max([1.0, *(bar.end_ms for bar in drawn)])
    scale = AXIS_WIDTH / span
    height = ROW_HEIGHT * (len(drawn) + 1) + 20
    rows = []
    for n, bar in enumerate(drawn):
        y = 10 + n * ROW_HEIGHT
        x = LABEL_WIDTH + bar.start_ms * scale
        width = max(2.0, (bar.end_ms - bar.start_ms) * scale)
        took = bar.end_ms - bar.start_ms
        rows.append(
            f'<text x="{LABEL_WIDTH - 8}" y="{y + 17}" text-anchor="end">{escape(bar.name)}</text>'
            f'<rect class="bar" data-step="{escape(bar.name)}" data-start-ms="{bar.start_ms:.3f}"'
            f' data-end-ms="{bar.end_ms:.3f}" x="{x:.1f}" y="{y}" width="{width:.1f}"'
            f' height="{ROW_HEIGHT - 10}" fill="{COLOURS.get(bar.kind, "#455a64")}">'
            f"<title>{escape(bar.name)}: {took:.1f} ms, {escape(bar.note)}</title></rect>"
            f'<text x="{x + width + 6:.1f}" y="{y + 17}" class="note">'
            f"{took:.1f} ms · {escape(bar.note)}</text>"
        )
    axis_y = 10 + len(drawn) * ROW_HEIGHT
    ticks = []
    for n in range(6):
        at = span * n / 5
        x = LABEL_WIDTH + at * scale
        ticks.append(
            f'<line x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{axis_y}" class="grid"/>'
            f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{at:.0f} ms</text>'
        )
    traced = f" Trace <code>{escape(timeline.trace_id)}</code>." if timeline.trace_id else ""
    title = f"Order {timeline.order_id}: {timeline.state}"
    if timeline.reason:
        title += f" ({timeline.reason})"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #212121; }}
svg text {{ font-size: 13px; fill: #212121; }} svg text.note {{ fill: #555; font-size: 12px; }}
line.grid {{ stroke: #e0e0e0; }}
</style></head><body>
<h1 style="font-size:18px">{escape(title)}</h1>
<p>Saga {timeline.saga_id}, accepted {timeline.accepted_at.isoformat()}; time in ms after
acceptance. Steps whose bars overlap ran at the same time.{traced}</p>
<svg xmlns="http://www.w3.org/2000/svg" width="{LABEL_WIDTH + AXIS_WIDTH + 260}"
 height="{height}" role="img" aria-label="saga timeline">
{"".join(ticks)}{"".join(rows)}
</svg></body></html>
"""


def timeline_blueprint(
    settings: Settings, engine: Engine, source: TimelineSource, reader: Reader
) -> Blueprint:
    """The timeline endpoints, behind the API key like every order endpoint: a key sees
    the timelines of its customers' orders only."""
    bp = Blueprint("timeline", __name__, url_prefix="/orders")

    @bp.before_request
    def authenticate() -> None:
        require_key(engine)

    def load(order_id: str) -> SagaTimeline:
        try:
            wanted = UUID(order_id)
        except ValueError:
            raise NotFound(f"no order {order_id}") from None
        status = reader.status(wanted)
        if status is None or not may_see(status.customer_id):
            raise NotFound(f"no order {order_id}")
        found = source.timeline(wanted)
        if found is None:
            # The order stays; its saga went with the retention job (RETAIN_SAGAS_DAYS).
            raise NotFound(
                f"the timeline of order {order_id} has expired: a finished saga is kept"
                f" {settings.retain_sagas_days:g} days"
            )
        return found

    @bp.get("/<order_id>/timeline")
    def timeline(order_id: str) -> Response:
        return Response(json.dumps(timeline_json(load(order_id))), mimetype="application/json")

    @bp.get("/<order_id>/timeline.html")
    def timeline_page(order_id: str) -> Response:
        return Response(render_html(load(order_id)), mimetype="text/html")

    return bp
