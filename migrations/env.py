"""Alembic environment: migrate the database named by DATABASE_URL."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

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


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
