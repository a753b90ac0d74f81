"""The system's processes connect to PostgreSQL as a role that reads and writes rows and
nothing more; every connection needs a password. (The rest of the suite runs the system
as that role: it needs no more.)"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from scripts.services import PG_APP_ROLE, PG_OWNER, LocalPostgres
from tests.conftest import ROOT, Servers, migrate
from tests.helpers import add_product

#: The SQLSTATE of a privilege refused.
INSUFFICIENT_PRIVILEGE = "42501"


def refused(engine: Engine, sql: str) -> str:
    """Run ``sql`` in a transaction that is rolled back whatever happens; return the
    SQLSTATE it failed with."""
    with engine.connect() as conn:
        tx = conn.begin()
        try:
            with pytest.raises(DBAPIError) as raised:
                conn.execute(text(sql))
        finally:
            tx.rollback()
    return str(getattr(raised.value.orig, "pgcode", ""))


def test_the_application_role_is_no_superuser_and_may_not_change_the_schema(
    engine: Engine,
) -> None:
    with engine.connect() as conn:
        me = conn.execute(
            text(
                "SELECT current_user, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls"
                " FROM pg_roles WHERE rolname = current_user"
            )
        ).one()
        may_create = conn.execute(
            text(
                "SELECT has_schema_privilege('public', 'CREATE'),"
                " has_database_privilege(current_database(), 'CREATE'),"
                " has_database_privilege(current_database(), 'TEMP')"
            )
        ).one()
    assert tuple(me) == (PG_APP_ROLE, False, False, False, False)
    assert tuple(may_create) == (False, False, False)
    assert refused(engine, "CREATE TABLE intruder (id int)") == INSUFFICIENT_PRIVILEGE
    assert refused(engine, "CREATE TEMP TABLE intruder (id int)") == INSUFFICIENT_PRIVILEGE
    assert refused(engine, "CREATE FUNCTION f() RETURNS int AS 'SELECT 1' LANGUAGE sql") == (
        INSUFFICIENT_PRIVILEGE
    )
    for statement in (
        "ALTER TABLE products ADD COLUMN intruder int",
        "DROP TABLE products",
        "TRUNCATE products",
        "CREATE INDEX intruder ON products (name)",
    ):
        assert refused(engine, statement) == INSUFFICIENT_PRIVILEGE, statement


def test_the_application_role_runs_no_program_and_reads_no_server_file(engine: Engine) -> None:
    for statement in (
        "COPY products (id) FROM PROGRAM 'id'",
        "COPY (SELECT 1) TO PROGRAM 'id'",
        "COPY products (id) FROM '/etc/passwd'",
        "SELECT pg_read_file('/etc/passwd')",
        "CREATE ROLE intruder SUPERUSER",
        "ALTER ROLE current_user SUPERUSER",
    ):
        assert refused(engine, statement) == INSUFFICIENT_PRIVILEGE, statement


def test_the_application_role_uses_the_rows_of_every_table_and_sequence(engine: Engine) -> None:
    with engine.connect() as conn:
        tables = [t for t in inspect(conn).get_table_names() if t != "alembic_version"]
        missing = conn.execute(
            text(
                "SELECT c.relname, p.privilege FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'"
                " CROSS JOIN unnest(CASE c.relkind WHEN 'S' THEN ARRAY['USAGE']"
                " ELSE ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'] END) AS p(privilege)"
                " WHERE c.relkind IN ('r', 'p', 'S')"
                " AND c.relname NOT IN ('alembic_version', 'api_keys')"
                " AND NOT CASE c.relkind WHEN 'S' THEN has_sequence_privilege(c.oid, p.privilege)"
                " ELSE has_table_privilege(c.oid, p.privilege) END"
            )
        ).all()
        version = conn.execute(
            text(
                "SELECT has_table_privilege('alembic_version', 'SELECT'),"
                " has_table_privilege('alembic_version', 'UPDATE')"
            )
        ).one()
    assert "orders" in tables and "products" in tables
    assert missing == []
    assert tuple(version) == (True, False)  # it reads the schema's revision, no more
    keys = conn_privileges(engine, "api_keys")
    assert keys == {"SELECT": True, "INSERT": False, "UPDATE": False, "DELETE": False}
    add_product(engine, on_hand=1)  # rows: yes


def conn_privileges(engine: Engine, table: str) -> dict[str, bool]:
    with engine.connect() as conn:
        return {
            p: bool(conn.execute(text(f"SELECT has_table_privilege('{table}', '{p}')")).scalar())
            for p in ("SELECT", "INSERT", "UPDATE", "DELETE")
        }


def test_the_application_role_can_neither_mint_nor_revive_an_api_key(engine: Engine) -> None:
    assert (
        refused(
            engine,
            "INSERT INTO api_keys (id, name, role, secret_hash)"
            " VALUES ('abcdefabcdef', 'x', 'operator', repeat('0', 64))",
        )
        == INSUFFICIENT_PRIVILEGE
    )
    assert refused(engine, "UPDATE api_keys SET revoked_at = NULL") == INSUFFICIENT_PRIVILEGE
    assert refused(engine, "DELETE FROM api_keys") == INSUFFICIENT_PRIVILEGE


def test_the_owner_owns_the_schema_and_is_no_superuser(owner_engine: Engine) -> None:
    with owner_engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT rolsuper, (SELECT tableowner FROM pg_tables WHERE tablename ="
                " 'orders') FROM pg_roles WHERE rolname = current_user"
            )
        ).one()
    assert tuple(row) == (False, PG_OWNER)


@pytest.mark.parametrize("password", [None, "wrong-password"])
def test_every_connection_needs_the_password(servers: Servers, password: str | None) -> None:
    for role in ("app", "owner", "admin"):
        known = make_url(servers.postgres.url(role=role))
        for host in ("127.0.0.1", str(servers.postgres.sockets)):
            url = URL.create(
                known.drivername, known.username, password, host, known.port, known.database
            )
            stranger = create_engine(url)
            try:
                with pytest.raises(OperationalError, match="password"):
                    stranger.connect().close()
            finally:
                stranger.dispose()


@pytest.fixture
def blank_cluster() -> Iterator[LocalPostgres]:
    """A cluster of our own with only its superuser, as the postgres image makes one."""
    postgres = LocalPostgres(Path(tempfile.mkdtemp(prefix="orders-initdb-")), fsync=False)
    postgres.start()
    try:
        postgres.psql("postgres", f"DROP ROLE {PG_APP_ROLE}; DROP ROLE {PG_OWNER};")
        postgres.psql("postgres", "CREATE DATABASE orders")  # POSTGRES_DB, the superuser's
        yield postgres
    finally:
        postgres.stop("immediate")
        shutil.rmtree(postgres.base, ignore_errors=True)


def test_the_compose_init_script_gives_the_same_roles(
    blank_cluster: LocalPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docker-compose.yml's postgres runs config/postgres/*.sql once, as its superuser,
    with the passwords in its environment; the migrations then run as the owner."""
    monkeypatch.setenv("OWNER_DB_PASSWORD", blank_cluster.passwords.owner)
    monkeypatch.setenv("APP_DB_PASSWORD", blank_cluster.passwords.app)
    for script in sorted((ROOT / "config" / "postgres").glob("*.sql")):
        blank_cluster.psql("orders", script.read_text())
    migrate(blank_cluster.url(role="owner"))
    app = create_engine(blank_cluster.url(role="app"))
    try:
        add_product(app, on_hand=1)
        assert refused(app, "CREATE TABLE intruder (id int)") == INSUFFICIENT_PRIVILEGE
        assert refused(app, "COPY products (id) FROM PROGRAM 'id'") == INSUFFICIENT_PRIVILEGE
        with app.connect() as conn:
            assert (
                conn.execute(
                    text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                ).scalar_one()
                is False
            )
    finally:
        app.dispose()


def test_the_compose_init_script_fails_without_its_passwords(
    blank_cluster: LocalPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OWNER_DB_PASSWORD", raising=False)
    monkeypatch.delenv("APP_DB_PASSWORD", raising=False)
    script = (ROOT / "config" / "postgres" / "10-least-privilege.sql").read_text()
    with pytest.raises(subprocess.CalledProcessError) as raised:
        blank_cluster.psql("orders", script)
    assert "OWNER_DB_PASSWORD is not set" in raised.value.stderr
    assert (
        blank_cluster.psql(
            "orders", "SELECT count(*) FROM pg_roles WHERE rolname = 'orders'"
        ).strip()
        == "0"
    )
