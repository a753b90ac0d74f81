"""Stock: reserve, release and commit units of products, atomically.

Each function runs inside the caller's transaction. The invariant (reserved never above
on hand, nothing negative) is decided by the database: a conditional UPDATE, rows locked
in id order, and CHECK constraints behind both. Statements are built once (compiled once).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, Integer, String, Update, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from config.database import prepared
from orders.tables import products

#: (product id, quantity) pairs with distinct product ids.
Lines = Sequence[tuple[str, int]]

_p = products.c
#: Every line at once: the lines as a table of (id, qty) from two array parameters.
_lines = (
    func.unnest(bindparam("ids", type_=ARRAY(String)), bindparam("qtys", type_=ARRAY(Integer)))
    .table_valued("id", "qty")
    .render_derived()
)

_RESERVE_ONE = prepared(
    "reserve_stock_one",
    update(products)
    .where(_p.id == bindparam("product_id"))
    .where(_p.on_hand - _p.reserved >= bindparam("quantity"))
    .values(reserved=_p.reserved + bindparam("quantity")),
)
_LOCK_AVAILABLE = prepared(
    "lock_stock",
    select(_p.id, _p.on_hand - _p.reserved)
    .where(_p.id == func.any(bindparam("ids", type_=ARRAY(String))))
    .order_by(_p.id)
    .with_for_update(),
)
_RESERVE = prepared(
    "reserve_stock",
    update(products).where(_p.id == _lines.c.id).values(reserved=_p.reserved + _lines.c.qty),
)
_RELEASE = prepared(
    "release_stock",
    update(products).where(_p.id == _lines.c.id).values(reserved=_p.reserved - _lines.c.qty),
)
#: Reserved units become units gone (on hand and reserved both drop); used by
#: ``orders.services.confirm_order`` inside its single statement.
COMMIT = (
    update(products)
    .where(_p.id == _lines.c.id)
    .values(reserved=_p.reserved - _lines.c.qty, on_hand=_p.on_hand - _lines.c.qty)
)

#: A refund: units come back on hand.
_RETURN = update(products).where(_p.id == _lines.c.id).values(on_hand=_p.on_hand + _lines.c.qty)
#: A refund undone: returned units go again, if they were not reserved meanwhile.
_TAKE_BACK = (
    update(products)
    .where(_p.id == _lines.c.id)
    .where(_p.on_hand - _p.reserved >= _lines.c.qty)
    .values(on_hand=_p.on_hand - _lines.c.qty)
)


def arrays(lines: Lines) -> dict[str, list[str] | list[int]]:
    """The lines as the parameters of the statements on several lines (ids, qtys), in
    product id order, the order reservations lock in."""
    ordered = sorted(lines)
    return {"ids": [product_id for product_id, _ in ordered], "qtys": [qty for _, qty in ordered]}


def reserve_stock(conn: Connection, lines: Lines) -> bool:
    """Reserve every line, or none of them; False when any product is short."""
    if len(lines) == 1:
        ((product_id, quantity),) = lines
        reserved = conn.execute(_RESERVE_ONE, {"product_id": product_id, "quantity": quantity})
        return reserved.rowcount == 1
    # Several products: lock them in id order (no deadlock between two orders), check
    # all, then reserve all.
    wanted = dict(lines)
    available = dict(conn.execute(_LOCK_AVAILABLE, {"ids": sorted(wanted)}).all())
    if any(available.get(product_id, 0) < qty for product_id, qty in wanted.items()):
        return False
    _adjust(conn, _RESERVE, lines)
    return True


def release_stock(conn: Connection, lines: Lines) -> None:
    """Give reserved units back (compensation of a reservation)."""
    _adjust(conn, _RELEASE, lines)


def _adjust(conn: Connection, statement: Update, lines: Lines) -> None:
    done = conn.execute(statement, arrays(lines))
    if done.rowcount != len(lines):
        raise LookupError(f"stock change touched {done.rowcount} of {len(lines)} products")


def return_stock(conn: Connection, lines: Lines) -> None:
    """Put the units of a refunded order back on hand."""
    _adjust(conn, _RETURN, lines)


def take_back_stock(conn: Connection, lines: Lines) -> None:
    """Undo ``return_stock`` (compensation of a refund). LookupError when units it
    returned were reserved meanwhile: the caller's transaction must then roll back."""
    _adjust(conn, _TAKE_BACK, lines)
