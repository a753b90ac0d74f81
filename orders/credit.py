"""Credit: reserve, release and commit amounts against a customer's limit, atomically.

Each function runs inside the caller's transaction. The invariant (used + reserved never
above the limit) is decided by one conditional UPDATE, with a CHECK constraint behind it.
Statements are built once (compiled once).
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Connection, Numeric, Update, bindparam, update

from orders.tables import customers

_c = customers.c
_amount = bindparam("amount", type_=Numeric(14, 2))

_RESERVE = (
    update(customers)
    .where(_c.id == bindparam("account"))
    .where(_c.credit_limit - _c.credit_used - _c.credit_reserved >= _amount)
    .values(credit_reserved=_c.credit_reserved + _amount)
)
_RELEASE = (
    update(customers)
    .where(_c.id == bindparam("account"))
    .values(credit_reserved=_c.credit_reserved - _amount)
)
#: A reservation becomes credit used; used by ``orders.services.confirm_order`` inside
#: its single statement.
COMMIT = (
    update(customers)
    .where(_c.id == bindparam("account"))
    .values(credit_reserved=_c.credit_reserved - _amount, credit_used=_c.credit_used + _amount)
)


def reserve_credit(conn: Connection, customer_id: str, amount: Decimal) -> bool:
    """Reserve ``amount`` of the customer's credit; False when it would pass the limit."""
    reserved = conn.execute(_RESERVE, {"account": customer_id, "amount": amount})
    return reserved.rowcount == 1


def release_credit(conn: Connection, customer_id: str, amount: Decimal) -> None:
    """Give a reservation back (compensation)."""
    _adjust(conn, _RELEASE, customer_id, amount)


def _adjust(conn: Connection, statement: Update, customer_id: str, amount: Decimal) -> None:
    done = conn.execute(statement, {"account": customer_id, "amount": amount})
    if done.rowcount != 1:
        raise LookupError(f"no customer {customer_id!r}")
