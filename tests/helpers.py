"""Test data and waiting helpers shared by the test tiers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

from sqlalchemy import Engine, func, insert, select

from orders.tables import customers, order_events, order_lines, orders, products
from sagas.tables import saga_steps, sagas

T = TypeVar("T")


def random_ref(prefix: str) -> str:
    """A fresh id, so tests never share rows."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def add_product(engine: Engine, *, on_hand: int, price: str = "10.00") -> str:
    """Insert a product and return its id."""
    product_id = random_ref("SKU")
    with engine.begin() as conn:
        conn.execute(
            insert(products).values(
                id=product_id, name="test product", unit_price=Decimal(price), on_hand=on_hand
            )
        )
    return product_id


def add_customer(engine: Engine, *, limit: str) -> str:
    """Insert a customer with a credit limit and return its id."""
    customer_id = random_ref("CUST")
    with engine.begin() as conn:
        conn.execute(
            insert(customers).values(
                id=customer_id, name="test customer", credit_limit=Decimal(limit)
            )
        )
    return customer_id


@dataclass(frozen=True)
class Stock:
    """A product's stock figures."""

    on_hand: int
    reserved: int


@dataclass(frozen=True)
class Credit:
    """A customer's credit figures."""

    limit: Decimal
    used: Decimal
    reserved: Decimal


def stock_of(engine: Engine, product_id: str) -> Stock:
    """The product's stock now."""
    with engine.connect() as conn:
        row = conn.execute(
            select(products.c.on_hand, products.c.reserved).where(products.c.id == product_id)
        ).one()
    return Stock(row.on_hand, row.reserved)


def credit_of(engine: Engine, customer_id: str) -> Credit:
    """The customer's credit now."""
    c = customers.c
    with engine.connect() as conn:
        row = conn.execute(
            select(c.credit_limit, c.credit_used, c.credit_reserved).where(c.id == customer_id)
        ).one()
    return Credit(row.credit_limit, row.credit_used, row.credit_reserved)


def row_counts(engine: Engine) -> dict[str, int]:
    """How many rows each table the API writes holds. (Not the outbox: an entry is only
    ever written with its saga, and the API removes entries in the background.)"""
    with engine.connect() as conn:
        return {
            table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (orders, order_lines, order_events, sagas, saga_steps)
        }


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
