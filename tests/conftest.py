"""Real PostgreSQL and Redis for the whole session, started on 127.0.0.1 by the tests.

Nothing is skipped when a server cannot start: the session fails, loudly.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from config.database import make_engine
from config.settings import POOL_PRESETS, Settings
from orders import keys
from scripts.services import LocalPostgres, LocalRedis

ROOT = Path(__file__).resolve().parent.parent
#: The API key every test client sends: a client key for every customer.
API_KEY = "osk_test00client_" + "c" * 43
#: An operator's key (the /admin and /batches endpoints).
ADMIN_KEY = "osk_test0operate_" + "o" * 43


@dataclass(frozen=True)
class Servers:
    """The session's database and Redis servers."""

    base: Path
    postgres: LocalPostgres
    redis: LocalRedis


def migrate(database_url: str, revision: str = "head") -> None:
    """Run the project's Alembic migrations against ``database_url``."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", database_url)
    config.attributes["configure_logger"] = False
    command.upgrade(config, revision)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """PostgreSQL and Redis, migrated, for the whole session."""
    base = Path(tempfile.mkdtemp(prefix="orders-tests-"))
    # Crash safety of the OS is not under test here; process kills are, and they keep
    # the page cache, so fsync off loses nothing that matters and saves time.
    postgres = LocalPostgres(base, fsync=False)
    redis = LocalRedis(base, password=secrets.token_hex(16))
    postgres.start()
    try:
        redis.start()
        postgres.create_database("orders")
        migrate(postgres.url(role="owner"))  # the schema's owner; the tests' processes
        yield Servers(base, postgres, redis)  # connect as the application's role
    finally:
        redis.stop()
        postgres.stop("immediate")
        assert not postgres.running(), "the test PostgreSQL server is still running"
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(servers: Servers) -> Settings:
    """Settings pointing at the session's servers; API_KEY and ADMIN_KEY registered."""
    settings = Settings(
        env="test",
        database_url=servers.postgres.url(),
        db_pool=POOL_PRESETS["test"],
        broker_url=servers.redis.url(0),
        result_backend_url=servers.redis.url(1),
        dispatch_timeout_seconds=0.5,
    )
    register_test_keys(settings, servers.postgres.url(role="owner"))
    return settings


def register_test_keys(settings: Settings, owner_url: str) -> None:
    """Register API_KEY and ADMIN_KEY in the settings' database (once), as the owner
    (the system's own role only reads keys)."""
    engine = make_engine(replace(settings, database_url=owner_url), application_name="orders-tests")
    try:
        with engine.begin() as conn:
            keys.add_known_key(conn, API_KEY, "tests: every customer")
            keys.add_known_key(conn, ADMIN_KEY, "tests: operator", role=keys.Role.OPERATOR)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    """An engine on the session's database."""
    engine = make_engine(settings, application_name="orders-tests")
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def owner_engine(servers: Servers, settings: Settings) -> Iterator[Engine]:
    """An engine on the session's database as the schema's owner, for what the system
    itself may not do (DDL, cleaning up beyond rows)."""
    engine = make_engine(
        replace(settings, database_url=servers.postgres.url(role="owner")),
        application_name="orders-tests-owner",
    )
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def saga_test_tables(owner_engine: Engine) -> None:
    """The test-only trip saga's tables (workers.testing_sagas), created by the schema's
    owner and granted to the system's role."""
    from scripts.services import PG_APP_ROLE
    from workers.testing_sagas import create_test_tables

    with owner_engine.begin() as conn:
        create_test_tables(conn, PG_APP_ROLE)
