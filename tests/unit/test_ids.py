"""New ids are UUID version 7: ordered by creation, so new rows land at the right edge
of the indexes keyed by them."""

from __future__ import annotations

import time
import uuid

from config.ids import new_id


def test_new_ids_are_version_7_plain_uuids_in_creation_order() -> None:
    ids = []
    for _ in range(5):
        ids.append(new_id())
        time.sleep(0.002)  # a new millisecond: the order is by time, not within one ms
    assert all(type(i) is uuid.UUID and i.version == 7 for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    now_ms = int(time.time() * 1000)
    assert 0 <= now_ms - (ids[-1].int >> 80) < 60_000
