"""Credit: reserve, release and commit amounts against a customer's limit, atomically.

Each function runs inside the caller's transaction. The invariant (used + reserved never
above the limit) is decided by one conditional UPDATE, with a CHECK constraint behind it.
Statements are built once (compiled once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Connection, Numeric, String, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from config.database import prepared
from orders.tables import customers

_c = customers.c
_amount = bindparam("amount", type_=Numeric(14, 2))
#: A customer's figures, as CreditFigures takes them.
FIGURES = (_c.id, _c.credit_limit, _c.credit_used, _c.credit_reserved, _c.credit_version)

_RESERVE = prepared(
    "reserve_credit",
    update(customers)
    .where(_c.id == bindparam("account"))
    .where(_c.credit_limit - _c.credit_used - _c.credit_reserved >= _amount)
    .values(credit_reserved=_c.credit_reserved + _amount, credit_version=_c.credit_version + 1)
    .returning(*FIGURES),
)
_RELEASE = prepared(
    "release_credit",
    update(customers)
    .where(_c.id == bindparam("account"))
    .values(credit_reserved=_c.credit_reserved - _amount, credit_version=_c.credit_version + 1)
    .returning(*FIGURES),
)
#: A refund: credit used goes down by the order's amount (never below nothing).
_RETURN = (
    update(customers)
    .where(_c.id == bindparam("account"))
    .where(_c.credit_used >= _amount)
    .values(credit_used=_c.credit_used - _amount, credit_version=_c.credit_version + 1)
    .returning(*FIGURES)
)
#: A refund undone: the amount is used again (even past a limit lowered meanwhile).
_TAKE_BACK = (
    update(customers)
    .where(_c.id == bindparam("account"))
    .values(credit_used=_c.credit_used + _amount, credit_version=_c.credit_version + 1)
    .returning(*FIGURES)
)
_FIGURES = select(*FIGURES).where(_c.id == func.any(bindparam("ids", type_=ARRAY(String))))
#: A reservation becomes credit used; used by ``orders.services.confirm_order`` inside
#: its single statement.
COMMIT = (
    update(customers)
    .where(_c.id == bindparam("account"))
    .values(
        credit_reserved=_c.credit_reserved - _amount,
        credit_used=_c.credit_used + _amount,
        credit_version=_c.credit_version + 1,
    )
)


@dataclass(frozen=True)
class CreditFigures:
    """A customer's credit at one version (what the credit cache holds)."""

    customer_id: str
    limit: Decimal
    used: Decimal
    reserved: Decimal
    version: int

    @property
    def available(self) -> Decimal:
        """What the customer may still reserve (negative when a limit was lowered)."""
        return self.limit - self.used - self.reserved


def reserve_credit(conn: Connection, customer_id: str, amount: Decimal) -> CreditFigures | None:
    """Reserve ``amount`` of the customer's credit and return the new figures; None
    when it would pass the limit."""
    row = conn.execute(_RESERVE, {"account": customer_id, "amount": amount}).first()
    return None if row is None else CreditFigures(*row)


def credit_figures(conn: Connection, customer_ids: Sequence[str]) -> list[CreditFigures]:
    """The current figures of these customers (unknown ones left out)."""
    rows = conn.execute(_FIGURES, {"ids": list(customer_ids)}).all()
    return [CreditFigures(*row) for row in rows]


def release_credit(conn: Connection, customer_id: str, amount: Decimal) -> CreditFigures:
    """Give a reservation back (compensation); the new figures."""
    row = conn.execute(_RELEASE, {"account": customer_id, "amount": amount}).first()
    if row is None:
        raise LookupError(f"no customer {customer_id!r}")
    return CreditFigures(*row)


def return_credit(conn: Connection, customer_id: str, amount: Decimal) -> CreditFigures | None:
    """Give a refunded order's amount back to the customer's credit; the new figures, or
    None when the customer does not use that much (the refund is then refused)."""
    row = conn.execute(_RETURN, {"account": customer_id, "amount": amount}).first()
    return None if row is None else CreditFigures(*row)


def take_back_credit(conn: Connection, customer_id: str, amount: Decimal) -> CreditFigures:
    """Undo ``return_credit`` (compensation of a refund); the new figures."""
    row = conn.execute(_TAKE_BACK, {"account": customer_id, "amount": amount}).first()
    if row is None:
        raise LookupError(f"no customer {customer_id!r}")
    return CreditFigures(*row)
