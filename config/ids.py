"""New ids: UUID version 7 (RFC 9562), time-ordered.

A version 4 id is random, so each new row of a table keyed by it lands on a random page
of its index: with years of rows, the pages an insert touches are spread over the whole
index, which stops fitting in PostgreSQL's shared buffers (a read, and later a write of
a dirty page, per insert) and is written to the WAL in full after every checkpoint. A
version 7 id begins with its creation time in milliseconds, so new rows land at the
right edge of every index keyed by it (orders, their lines and events, sagas, their
steps, the consumers' positions): the pages an order touches are the recent ones,
whatever the history. The other 74 bits are random (``uuid6.uuid7``), so ids stay
unguessable; they do tell when they were made, to the millisecond, as the order's
``created_at`` does anyway.
"""

from __future__ import annotations

import uuid

from uuid6 import uuid7


def new_id() -> uuid.UUID:
    """A new time-ordered id (a plain ``uuid.UUID``)."""
    return uuid.UUID(int=uuid7().int)
