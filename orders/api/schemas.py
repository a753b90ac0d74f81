"""The API's request and response bodies (pydantic), the source of the OpenAPI schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

#: Customer and product ids: letters, digits and ``. _ : -``, up to 64 characters.
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
Ref = Annotated[str, StringConstraints(pattern=REF_PATTERN)]
#: Amounts of money travel as decimal strings ("12.50"), never as JSON numbers.
MoneyText = Annotated[str, Field(pattern=r"^-?\d+\.\d{2}$", examples=["12.50"])]


#: Past this magnitude a float cannot hold every whole number (2**53 + 1 reads as 2**53):
#: a larger one written with a fraction or an exponent is refused rather than guessed.
EXACT_FLOAT_LIMIT = 2**53


def whole_number(value: Any) -> Any:
    """A JSON number without a fraction (``2.0``) as the integer it is: JSON has a single
    number type, and JSON Schema's ``integer`` takes ``2.0`` too. Anything else is left
    to the strict check (``true``, ``"2"`` and ``2.5`` stay refused)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= EXACT_FLOAT_LIMIT:
        return int(value)
    return value


#: A whole number of at least one, written ``2`` or ``2.0``.
Count = Annotated[int, Field(ge=1), BeforeValidator(whole_number)]


class LineIn(BaseModel):
    """One line of an order: a product and a whole, positive quantity."""

    model_config = ConfigDict(extra="forbid", strict=True)

    product_id: Ref
    quantity: Count


class OrderIn(BaseModel):
    """The body of ``POST /orders``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    customer_id: Ref
    lines: Annotated[list[LineIn], Field(min_length=1)]


class Links(BaseModel):
    """Where to read the order."""

    self: str
    status: str


class AcceptedOut(BaseModel):
    """The answer to an accepted order (202)."""

    order_id: UUID
    status: str
    links: Links


class ActionOut(BaseModel):
    """The answer to a cancel or refund (202): what was done. "cancelled": the order is
    CANCELLED (reason customer_cancelled); "refund": a refund saga runs, or ran (the
    order was confirmed first, or a refund was asked for); follow ``links.status``."""

    order_id: UUID
    outcome: Literal["cancelled", "refund"]
    #: The refund saga, when the outcome is a refund.
    refund_saga_id: UUID | None
    links: Links


class StatusOut(BaseModel):
    """An order's status."""

    order_id: UUID
    status: str
    cancel_reason: str | None
    updated_at: datetime


class LineOut(BaseModel):
    """One line of an order as stored."""

    product_id: str
    quantity: int
    unit_price: MoneyText


class OrderOut(BaseModel):
    """An order with its lines."""

    order_id: UUID
    customer_id: str
    status: str
    cancel_reason: str | None
    #: Set while the order is COMPENSATION_FAILED: why its reservations are not released.
    problem: str | None
    total: MoneyText
    lines: list[LineOut]
    created_at: datetime
    updated_at: datetime


class Problem(BaseModel):
    """An RFC 9457 problem detail."""

    type: str
    title: str
    status: int
    detail: str | None = None
    errors: list[dict[str, str]] | None = None
    #: How many more errors there were than ``errors`` lists.
    errors_omitted: int | None = None


class StatusesOut(BaseModel):
    """Several orders' statuses; the ids that name no order."""

    statuses: list[StatusOut]
    unknown: list[str]


class CustomerOrdersOut(BaseModel):
    """A page of a customer's orders, newest first."""

    orders: list[OrderOut]
    #: The next (older) page, when there may be one.
    next: str | None


class CustomerSummaryOut(BaseModel):
    """A customer's orders at a glance (kept from the order events: it may trail the
    orders by the consumers' lag)."""

    customer_id: str
    orders_placed: int
    orders_confirmed: int
    orders_cancelled: int
    placed_total: MoneyText
    confirmed_total: MoneyText
    last_order_at: datetime | None
    #: Confirmed orders refunded since (still counted in orders_confirmed).
    orders_refunded: int
    refunded_total: MoneyText


class CreditOut(BaseModel):
    """A customer's credit: the limit, what is used, what is reserved, what is left."""

    customer_id: str
    limit: MoneyText
    used: MoneyText
    reserved: MoneyText
    available: MoneyText


class TimelineStepOut(BaseModel):
    """One saga step as it ran."""

    step: str
    started_at: datetime
    finished_at: datetime
    duration_ms: float
    #: APPLIED, REFUSED, ABORTED or COMPENSATED.
    outcome: str
    reason: str | None
    attempts: int


class RefundTimelineOut(BaseModel):
    """An order's refund saga on the same time axis."""

    saga_id: UUID
    state: str
    reason: str | None
    accepted_at: datetime
    finished_at: datetime | None
    steps: list[TimelineStepOut]


class TimelineOut(BaseModel):
    """An order's saga on a time axis: accepted, each step, decided."""

    order_id: UUID
    saga_id: UUID
    state: str
    reason: str | None
    accepted_at: datetime
    finished_at: datetime | None
    steps: list[TimelineStepOut]
    #: The order's refund saga (its steps return stock and credit), once one started.
    refund: RefundTimelineOut | None = None
    #: The order's OpenTelemetry trace id (32 hex digits); null when traces are off.
    trace_id: str | None = None


class HealthOut(BaseModel):
    """The process runs."""

    status: str


class ReadyOut(BaseModel):
    """Every dependency answered."""

    status: str
    checks: list[str]


class DeadLetterOut(BaseModel):
    """A dead letter as listed: everything but its traceback and raw message."""

    id: int
    task_id: str
    task_name: str
    #: exhausted, failed, poison, compensation_failed, undecodable, unknown_task...
    kind: str
    #: The task's arguments as they were sent (any JSON).
    args: Any
    kwargs: Any
    queue: str | None
    error: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    state: Literal["OPEN", "REPLAYED", "PURGED"]
    replayed_task_id: str | None


class DeadLetterDetailOut(DeadLetterOut):
    """A dead letter in full."""

    traceback: str | None
    #: The message's bytes as text, for a message no task ever ran.
    raw: str | None


class DeadLettersOut(BaseModel):
    """Dead letters matching a filter, most recent failure first."""

    dead_letters: list[DeadLetterOut]


class ReplayedOut(BaseModel):
    """Each replayed letter's id and the id of what now runs it (a task id,
    ``saga:<id>`` or ``sweep:<id>``)."""

    replayed: dict[str, str]


class PurgedOut(BaseModel):
    """How many of the letters were open and are now purged."""

    purged: int


class RunLinks(BaseModel):
    """Where to follow a batch run."""

    self: str


class RunStartedOut(BaseModel):
    """A batch run was started (202); Location: its progress."""

    run_id: UUID
    links: RunLinks


class CreditReviewOut(BaseModel):
    """A customer's latest credit review (the batch credit check's)."""

    customer_id: str
    #: The run that reviewed the customer last.
    run_id: UUID
    reviewed_at: datetime
    #: Over the limit or inconsistent: someone should look at this customer.
    flagged: bool
    #: Credit used and reserved together pass the limit.
    over_limit: bool
    #: The credit figures disagree with the customer's orders (``findings`` says how).
    inconsistent: bool
    findings: list[str]
    credit_limit: MoneyText
    credit_used: MoneyText
    credit_reserved: MoneyText
    available: MoneyText


class CreditReviewsOut(BaseModel):
    """A page of customers' latest credit reviews, by customer id."""

    credit_reviews: list[CreditReviewOut]
    #: The next page, when there is one.
    next: str | None


class BatchRunOut(BaseModel):
    """A batch run's progress."""

    id: UUID
    job: str
    window_key: str
    state: str
    total: int
    processed: int
    failed: int
    flagged: int
    chunks: int
    chunks_done: int
    chunks_failed: int
    started_at: datetime
    finished_at: datetime | None
    #: How often the batch sweep resumed the run.
    resumes: int
    #: Why the sweep gave up on the run (state FAILED).
    reason: str | None
    #: Percent of customers reviewed or given up on.
    progress: float
