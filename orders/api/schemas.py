"""The API's request and response bodies (pydantic), the source of the OpenAPI schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

#: Customer and product ids: letters, digits and ``. _ : -``, up to 64 characters.
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
Ref = Annotated[str, StringConstraints(pattern=REF_PATTERN)]
#: Amounts of money travel as decimal strings ("12.50"), never as JSON numbers.
MoneyText = Annotated[str, Field(pattern=r"^-?\d+\.\d{2}$", examples=["12.50"])]


class LineIn(BaseModel):
    """One line of an order: a product and a whole, positive quantity."""

    model_config = ConfigDict(extra="forbid", strict=True)

    product_id: Ref
    quantity: Annotated[int, Field(ge=1)]


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


class CreditOut(BaseModel):
    """A customer's credit: the limit, what is used, what is reserved, what is left."""

    customer_id: str
    limit: MoneyText
    used: MoneyText
    reserved: MoneyText
    available: MoneyText
