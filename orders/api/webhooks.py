"""``/webhooks``: a key's endpoints for the final states of the orders it placed, their
secrets (shown once; rotated with a grace period), their delivery logs, and the replay
of a delivery that died. A key sees only its own endpoints: another key's are 404."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

from flask import Blueprint, Response, g, request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy import Engine
from werkzeug.exceptions import BadRequest, Conflict, NotFound

from config.settings import Settings
from orders import webhook_deliveries, webhooks
from orders.api.auth import require_key
from orders.api.bodies import read_json
from orders.api.problems import capped_errors, problem

#: Deliveries per page of a log: by default, and at most.
DELIVERIES_PAGE, MAX_DELIVERIES_PAGE = 20, 100


class WebhookIn(BaseModel):
    """The body of ``POST /webhooks``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: Annotated[str, StringConstraints(min_length=1, max_length=webhooks.MAX_URL)]


class WebhookOut(BaseModel):
    """An endpoint (its secret is never shown again)."""

    id: UUID
    url: str
    created_at: datetime
    #: After a rotation, until when the previous secret still signs (a second signature).
    previous_secret_expires_at: datetime | None


class WebhookSecretOut(WebhookOut):
    """An endpoint just made or rotated, with its secret: keep it, it is shown once."""

    secret: Annotated[str, Field(pattern=r"^whsec_[A-Za-z0-9+/]+={0,2}$")]


class WebhooksOut(BaseModel):
    """The key's endpoints."""

    endpoints: list[WebhookOut]


class AttemptOut(BaseModel):
    """One attempt of a delivery."""

    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int


class DeliveryOut(BaseModel):
    """One event for one endpoint, and how sending it went."""

    id: UUID
    event_id: str
    event_type: str
    order_id: UUID
    state: Literal["PENDING", "DELIVERED", "DEAD"]
    attempts: int
    last_status: int | None
    last_error: str | None
    #: When the next attempt is due (PENDING only).
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None
    attempt_log: list[AttemptOut]


class DeliveriesOut(BaseModel):
    """An endpoint's latest deliveries, newest first."""

    deliveries: list[DeliveryOut]


class DeliveryReplayedOut(BaseModel):
    """A dead delivery handed back to the sender."""

    id: UUID
    state: Literal["PENDING"]


def webhooks_blueprint(settings: Settings, engine: Engine) -> Blueprint:
    """The ``/webhooks`` endpoints, for the calling key's own endpoints."""
    bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")
    grace = timedelta(seconds=settings.webhook_rotation_grace_seconds)

    @bp.before_request
    def authenticate() -> None:
        require_key(engine)

    @bp.post("")
    def create() -> Response:
        try:
            body = WebhookIn.model_validate(read_json(settings.max_body_bytes))
        except ValidationError as exc:
            errors = [
                {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            return problem(
                422,
                "Invalid webhook",
                "the request body does not match the schema",
                **capped_errors(errors),
            )
        try:
            url = webhooks.check_url(body.url, settings.env)
            endpoint = webhooks.create_endpoint(engine, g.client, url)
        except webhooks.InvalidWebhookUrlError as exc:
            return problem(
                422, "Invalid webhook", str(exc), **capped_errors([{"loc": "url", "msg": str(exc)}])
            )
        except webhooks.TooManyEndpointsError as exc:
            raise Conflict(str(exc)) from None
        response = _json(endpoint.to_json(), 201)
        response.headers["Location"] = f"/webhooks/{endpoint.id}"
        return response

    @bp.get("")
    def list_all() -> Response:
        found = webhooks.list_endpoints(engine, g.client)
        return _json({"endpoints": [e.to_json() for e in found]})

    @bp.delete("/<webhook_id>")
    def delete(webhook_id: str) -> Response:
        if not webhooks.delete_endpoint(engine, g.client, _uuid(webhook_id, "endpoint")):
            raise NotFound(f"no endpoint {webhook_id}")
        answer = Response(status=204)
        answer.headers.pop("Content-Type", None)  # no body, so no type
        return answer

    @bp.post("/<webhook_id>/rotate")
    def rotate(webhook_id: str) -> Response:
        endpoint = webhooks.rotate_secret(engine, g.client, _uuid(webhook_id, "endpoint"), grace)
        if endpoint is None:
            raise NotFound(f"no endpoint {webhook_id}")
        return _json(endpoint.to_json())

    @bp.get("/<webhook_id>/deliveries")
    def deliveries(webhook_id: str) -> Response:
        try:
            limit = int(request.args.get("limit", DELIVERIES_PAGE))
        except ValueError:
            raise BadRequest("limit is a number") from None
        if not 1 <= limit <= MAX_DELIVERIES_PAGE:
            raise BadRequest(f"limit is between 1 and {MAX_DELIVERIES_PAGE}")
        found = webhook_deliveries.list_deliveries(
            engine, g.client, _uuid(webhook_id, "endpoint"), limit
        )
        if found is None:
            raise NotFound(f"no endpoint {webhook_id}")
        return _json({"deliveries": found})

    @bp.post("/deliveries/<delivery_id>/replay")
    def replay(delivery_id: str) -> Response:
        ident = _uuid(delivery_id, "delivery")
        try:
            webhook_deliveries.replay(engine, g.client, ident)
        except webhook_deliveries.DeliveryNotFoundError:
            raise NotFound(f"no delivery {delivery_id}") from None
        except webhook_deliveries.DeliveryNotDeadError as exc:
            raise Conflict(str(exc)) from None
        return _json({"id": str(ident), "state": webhook_deliveries.PENDING}, 202)

    return bp


def _uuid(text: str, what: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise NotFound(f"no {what} {text}") from None


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")
