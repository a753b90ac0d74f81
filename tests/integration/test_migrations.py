"""The Alembic migrations build exactly the schema the code declares, and undo it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine

from orders.tables import metadata as orders_metadata
from sagas.tables import metadata as sagas_metadata
from tests.conftest import ROOT, Servers, migrate
from workers.tables import metadata as workers_metadata

DATABASE = "orders_migrations"


@pytest.fixture(scope="module")
def fresh(servers: Servers) -> Iterator[Engine]:
    servers.postgres.create_database(DATABASE)
    engine = create_engine(servers.postgres.url(DATABASE, role="owner"))
    yield engine
    engine.dispose()


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    return config


def test_there_is_one_head() -> None:
    assert len(ScriptDirectory.from_config(alembic_config("postgresql://")).get_heads()) == 1


def test_migrations_match_the_declared_tables(fresh: Engine) -> None:
    migrate(fresh.url.render_as_string(hide_password=False))
    with fresh.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        drift = compare_metadata(context, [orders_metadata, sagas_metadata, workers_metadata])
    assert drift == []


def test_migrations_name_every_constraint_as_the_tables_do(fresh: Engine) -> None:
    migrate(fresh.url.render_as_string(hide_password=False))
    declared = {
        str(constraint.name)
        for metadata in (orders_metadata, sagas_metadata, workers_metadata)
        for table in metadata.tables.values()
        for constraint in table.constraints
    }
    with fresh.connect() as conn:
        actual = set(
            conn.execute(
                text(
                    "SELECT conname FROM pg_constraint c JOIN pg_namespace n"
                    " ON n.oid = c.connamespace WHERE n.nspname = 'public'"
                    " AND conrelid <> 'alembic_version'::regclass"
                )
            ).scalars()
        )
    assert actual == declared


def test_migrations_downgrade_to_nothing_and_back(fresh: Engine) -> None:
    url = fresh.url.render_as_string(hide_password=False)
    migrate(url)
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(fresh).get_table_names()) == {"alembic_version"}
    migrate(url)
    assert "orders" in inspect(fresh).get_table_names()


def test_an_orders_problem_loses_the_database_text_on_upgrade(fresh: Engine) -> None:
    url = fresh.url.render_as_string(hide_password=False)
    migrate(url)
    command.downgrade(alembic_config(url), "0011")
    raw = (
        "IntegrityError: (psycopg2.errors.CheckViolation) new row violates check constraint"
        ' "ck_products_reserved_not_negative" DETAIL: Failing row contains (SKU-1, 5, -1).'
        " [SQL: UPDATE products SET reserved=reserved - %(q)s] [parameters: {'q': 5}]"
    )
    with fresh.begin() as conn:
        conn.execute(text("INSERT INTO customers (id, name, credit_limit) VALUES ('C', 'c', 1)"))
        for n, problem in enumerate((raw, "no class here", None)):
            conn.execute(
                text(
                    "INSERT INTO orders (id, customer_id, saga_id, status, total, problem,"
                    " version, created_at, updated_at) VALUES (gen_random_uuid(), 'C',"
                    " gen_random_uuid(), 'COMPENSATION_FAILED', 1, :p, 1, now(),"
                    " now() + :n * interval '1 s')"
                ),
                {"p": problem, "n": n},
            )
    migrate(url)
    with fresh.connect() as conn:
        problems = conn.execute(text("SELECT problem FROM orders ORDER BY updated_at")).scalars()
        assert list(problems) == [
            "IntegrityError: the compensation failed; it will be retried",
            "Error: the compensation failed; it will be retried",
            None,
        ]
