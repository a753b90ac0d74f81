"""Credit: reserve, release and commit amounts against a customer's limit, atomically.

Each function runs inside the caller's transaction. The invariant (used + reserved never
above the limit) is decided by one conditional UPDATE, with a CHECK constraint behind it.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Connection, update

from orders.tables import customers


def reserve_credit(conn: Connection, customer_id: str, amount: Decimal) -> bool:
    """Reserve ``amount`` of the customer's credit; False when it would pass the limit."""
    c = customers.c
    reserved = conn.execute(
        update(customers)
        .where(c.id == customer_id)
        .where(c.credit_limit - c.credit_used - c.credit_reserved >= amount)
        .values(credit_reserved=c.credit_reserved + amount)
    )
    return reserved.rowcount == 1


def release_credit(conn: Connection, customer_id: str, amount: Decimal) -> None:
    """Give a reservation back (compensation)."""
    _adjust(conn, customer_id, reserved=-amount)


def commit_credit(conn: Connection, customer_id: str, amount: Decimal) -> None:
    """Turn a reservation into credit used."""
    _adjust(conn, customer_id, reserved=-amount, used=amount)


def _adjust(
    conn: Connection, customer_id: str, *, reserved: Decimal, used: Decimal = Decimal(0)
) -> None:
    c = customers.c
    changes = {"credit_reserved": c.credit_reserved + reserved}
    if used:
        changes["credit_used"] = c.credit_used + used
    done = conn.execute(update(customers).where(c.id == customer_id).values(changes))
    if done.rowcount != 1:
        raise LookupError(f"no customer {customer_id!r}")
