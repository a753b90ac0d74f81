"""Sentinel URLs read the way kombu reads them, and handed to each library in its form."""

from __future__ import annotations

import pytest

from config.redis_client import is_sentinel, parse
from config.settings import load_settings
from orders.api.limits import _storage

URL = "sentinel://user:p%40ss@h1:26379;sentinel://h2:26380/3"


def test_a_sentinel_url_names_every_sentinel_the_database_and_the_master_password() -> None:
    target = parse(URL)
    assert target.sentinels == (("h1", 26379), ("h2", 26380))
    assert (target.db, target.username, target.password) == (3, "user", "p@ss")
    assert "p@ss" not in repr(target)
    assert is_sentinel(URL) and not is_sentinel("redis://h1:6379/0")


def test_a_url_without_sentinels_is_refused() -> None:
    with pytest.raises(ValueError):
        parse("sentinel://")


def test_the_rate_limit_counts_on_the_master_the_sentinels_name() -> None:
    settings = load_settings(
        {
            "REDIS_URL": URL,
            "REDIS_SENTINEL_MASTER": "shop",
            "RATE_LIMIT": "10/second",
        }
    )
    storage = _storage(settings.rate_limit_storage_url or "", settings)
    assert storage["storage_uri"] == "redis+sentinel://h1:26379,h2:26380/shop"
    options = storage["storage_options"]
    assert (options["db"], options["password"]) == (5, "p@ss")  # the caches' database
    # The sentinels ask for no password here: none is sent to them.
    assert options["sentinel_kwargs"]["password"] is None
    assert options["use_replicas"] is False
