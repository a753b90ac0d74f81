"""The event consumers' loop: when it looks again. A pass costs about the same for one
event as for fifty (docs/performance.md), so after a pass that applied events the loop
lets the next ones gather for ``EVENTS_BATCH_SECONDS``; with nothing new it looks again
after ``EVENTS_POLL_SECONDS``, so that the first event after a quiet spell is applied at
once; a full batch is followed by the next at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from config.settings import Settings
from orders.events import Tally
from workers import events

SETTINGS = Settings(
    env="test",
    database_url="postgresql://unused@127.0.0.1/unused",
    events_poll_seconds=0.05,
    events_batch_seconds=0.25,
)


@dataclass
class Feed:
    """The newest event id after each pass, and the consumer's checkpoint it reaches."""

    newest: list[int]
    passes: int = 0
    read: dict[int, int] = field(default_factory=dict)


@dataclass
class Stop:
    """Records each wait; stops the loop after the feed's last pass."""

    feed: Feed
    waits: list[float] = field(default_factory=list)

    def is_set(self) -> bool:
        return self.feed.passes >= len(self.feed.newest)

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)


@dataclass
class Named:
    name: str


def run(monkeypatch: pytest.MonkeyPatch, feed: Feed) -> list[float]:
    def newest(_engine: Any) -> int:
        feed.passes += 1
        return feed.newest[feed.passes - 1]

    def consume(_engine: Any, _consumer: Any, **_: Any) -> Tally:
        last = feed.newest[feed.passes - 1]
        return Tally(read=feed.read.get(feed.passes, 1), checkpoint=last)

    monkeypatch.setattr(events, "newest", newest)
    monkeypatch.setattr(events, "consume", consume)
    monkeypatch.setattr(events, "lag", lambda _engine, _name: 0)
    stop = Stop(feed)
    events.run(SETTINGS, None, [Named("a"), Named("b")], stop)  # type: ignore[arg-type]
    return stop.waits


def test_after_applying_events_the_next_pass_waits_for_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(monkeypatch, Feed(newest=[5, 9, 14])) == [0.25, 0.25, 0.25]


def test_with_nothing_new_it_looks_again_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    # Events up to 5, then nothing new for two passes, then an event: a quick look each
    # time nothing came, the batch window after each pass that applied something.
    assert run(monkeypatch, Feed(newest=[5, 5, 5, 6])) == [0.25, 0.05, 0.05, 0.25]


def test_a_full_batch_is_followed_by_the_next_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    feed = Feed(newest=[500, 1000, 1003], read={1: events.BATCH, 2: events.BATCH})
    assert run(monkeypatch, feed) == [0.25]
