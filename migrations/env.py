"""Alembic environment: migrate the database named by DATABASE_URL.

Migrations run as the schema's owner. The system's processes connect as another role
(DB_APP_ROLE, ``orders_app`` unless set) that may only read and write rows: after every
upgrade, that role gets SELECT, INSERT, UPDATE and DELETE on every table and the use of
every sequence (the tables a migration adds included), and only SELECT on
``alembic_version``. Where the role does not exist, nothing is granted.
"""

from __future__ import annotations

import os
import re
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from config.settings import load_settings
from orders.tables import metadata as orders_metadata
from sagas.tables import metadata as sagas_metadata
from workers.tables import metadata as workers_metadata

if context.config.config_file_name is not None and context.config.attributes.get(
    "configure_logger", True
):
    fileConfig(context.config.config_file_name)

#: Every table of the system, for autogenerate and the drift test.
target_metadata = [orders_metadata, sagas_metadata, workers_metadata]


def database_url() -> str:
    """The URL to migrate: an explicit ``sqlalchemy.url``, else the settings'."""
    return context.config.get_main_option("sqlalchemy.url") or load_settings().database_url


def app_role() -> str:
    """The role the system's processes connect as."""
    role = os.environ.get("DB_APP_ROLE") or "orders_app"
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        raise ValueError(f"DB_APP_ROLE is not a plain role name: {role!r}")
    return role


def grant_rows(connection: Connection, role: str) -> None:
    """Let ``role`` use the rows of every table and sequence, and change no schema."""
    if (
        connection.execute(
            text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}
        ).first()
        is None
    ):
        return
    # The role name was checked by app_role(), so formatting it into SQL is safe.
    for statement in (
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
        f"REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {role}",
    ):
        connection.execute(text(statement))
    # API keys are made and revoked by the owner (python -m orders.keys); the system
    # only reads them, so no process of it can mint a key or bring a revoked one back.
    if connection.execute(text("SELECT to_regclass('api_keys')")).scalar() is not None:
        connection.execute(text(f"REVOKE INSERT, UPDATE, DELETE ON api_keys FROM {role}"))


def run_migrations_offline() -> None:
    """Print the SQL instead of running it."""
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations against the database."""
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
            grant_rows(connection, app_role())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
