"""Stock: reserve, release and commit units of products, atomically.

Each function runs inside the caller's transaction. The invariant (reserved never above
on hand, nothing negative) is decided by the database: a conditional UPDATE, rows locked
in id order, and CHECK constraints behind both.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, Integer, String, column, select, update, values
from sqlalchemy.sql.expression import Values

from orders.tables import products

#: (product id, quantity) pairs with distinct product ids.
Lines = Sequence[tuple[str, int]]


def _quantities(lines: Lines) -> Values:
    """The lines as a VALUES list to join against products."""
    return values(column("id", String), column("qty", Integer), name="q").data(
        [(product_id, quantity) for product_id, quantity in lines]
    )


def reserve_stock(conn: Connection, lines: Lines) -> bool:
    """Reserve every line, or none of them; False when any product is short."""
    if len(lines) == 1:
        ((product_id, quantity),) = lines
        reserved = conn.execute(
            update(products)
            .where(products.c.id == product_id)
            .where(products.c.on_hand - products.c.reserved >= quantity)
            .values(reserved=products.c.reserved + quantity)
        )
        return reserved.rowcount == 1
    # Several products: lock them in id order (no deadlock between two orders), check
    # all, then reserve all.
    wanted = dict(lines)
    available = dict(
        conn.execute(
            select(products.c.id, products.c.on_hand - products.c.reserved)
            .where(products.c.id.in_(sorted(wanted)))
            .order_by(products.c.id)
            .with_for_update()
        ).all()
    )
    if any(available.get(product_id, 0) < qty for product_id, qty in wanted.items()):
        return False
    _adjust(conn, lines, reserved=1)
    return True


def release_stock(conn: Connection, lines: Lines) -> None:
    """Give reserved units back (compensation of a reservation)."""
    _adjust(conn, lines, reserved=-1)


def commit_stock(conn: Connection, lines: Lines) -> None:
    """Turn reserved units into units gone: on hand and reserved both drop."""
    _adjust(conn, lines, reserved=-1, on_hand=-1)


def _adjust(conn: Connection, lines: Lines, *, reserved: int, on_hand: int = 0) -> None:
    q = _quantities(lines)
    changes = {"reserved": products.c.reserved + reserved * q.c.qty}
    if on_hand:
        changes["on_hand"] = products.c.on_hand + on_hand * q.c.qty
    done = conn.execute(update(products).where(products.c.id == q.c.id).values(changes))
    if done.rowcount != len(lines):
        raise LookupError(f"stock change touched {done.rowcount} of {len(lines)} products")
