"""Building database engines. Nothing connects at import time."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import psycopg2  # type: ignore[import-untyped]
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.sql import Executable

from config import tracing
from config.settings import Settings

logger = logging.getLogger(__name__)

#: Constraint names follow one pattern, so migrations can name them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def make_engine(settings: Settings, *, application_name: str = "orders") -> Engine:
    """Create this process's engine; a forked process must build its own.

    Every session gets the statement, lock and idle-in-transaction timeouts of the
    settings: a statement stuck on a lock, or a transaction left open by a process that
    hung, fails (transiently) instead of holding rows for ever.

    A statement's parameters never appear in its errors (``hide_parameters``): the
    errors are logged and kept for operators, and parameters hold customers' data."""
    pool = settings.db_pool
    timeouts = " ".join(
        f"-c {name}={int(seconds * 1000)}"
        for name, seconds in (
            ("statement_timeout", settings.db_statement_timeout_seconds),
            ("lock_timeout", settings.db_lock_timeout_seconds),
            ("idle_in_transaction_session_timeout", settings.db_idle_in_transaction_seconds),
        )
    )
    engine = create_engine(
        settings.database_url,
        pool_size=pool.pool_size,
        max_overflow=pool.max_overflow,
        hide_parameters=True,
        pool_timeout=pool.pool_timeout,
        pool_recycle=pool.pool_recycle,
        # No pre-ping (a round trip and a transaction per checkout): a connection broken
        # by a database restart fails once, the pool then drops every older connection,
        # and the caller retries (tasks) or answers 503 (API).
        connect_args={
            "application_name": application_name,
            "connect_timeout": 5,
            "options": timeouts,
        },
    )
    if settings.db_prepared_statements:
        engine.dialect.do_execute = _preparing(engine.dialect.do_execute)  # type: ignore[method-assign]
    tracing.instrument_engine(engine)  # each statement a span, when traces are on
    return engine


# --- Prepared statements -------------------------------------------------------------
#
# PostgreSQL plans a statement each time it runs, unless the statement was prepared on
# the connection: then, after five runs, it keeps a generic plan if that plan is no
# costlier than the custom ones. psycopg2 sends every statement as text, so the hot
# statements are prepared with SQL's PREPARE, on each connection the first time it runs
# them, and run with EXECUTE from then on. A prepared statement belongs to its session:
# a new connection (after a restart, a recycle) prepares afresh.

E = TypeVar("E", bound=Executable)
#: The execution option that asks for a statement to be prepared (``prepared``).
PREPARED = "prepared"
#: A placeholder of the driver's (``%(name)s``) or an escaped percent sign.
_PLACEHOLDER = re.compile(r"%%|%\(([^)]+)\)s")
_naming = threading.Lock()  # one name per text, whichever thread asks first
#: The key, in a DBAPI connection's ``info``, of its prepared statements' states.
_ON_CONNECTION = "prepared"
#: What a prepared statement fails with when the session is not what it was: the plan's
#: result changed under it (a migration altered a column it returns), the session lost
#: it (``DEALLOCATE``, ``DISCARD ALL``), or already holds one of its name (a pooler that
#: hands one server session to several clients, prepared statements left on).
_STALE = frozenset({"0A000", "26000", "42P05"})


@dataclass(frozen=True)
class _Plan:
    name: str
    #: The statement with its parameters numbered, as PREPARE takes it.
    body: str
    #: The statement run once prepared.
    then: str
    #: The name the statement was marked with.
    given: str

    @property
    def first(self) -> str:
        """The statement prepared and run, in one round trip."""
        return f"PREPARE {self.name} AS {self.body}; {self.then}"


#: A statement's text -> how it runs prepared.
_plans: dict[str, _Plan] = {}


def prepared(name: str, statement: E) -> E:
    """Mark a statement (built once, run often) to run prepared on each connection, as
    ``name`` (what ``pg_stat_activity`` shows while it runs: ``EXECUTE name(...)``).
    Its text must be the same on every run (no IN list of varying length: ``= ANY`` of
    an array), or each text is prepared apart."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,50}", name):
        raise ValueError(f"a prepared statement's name is a lowercase identifier, not {name!r}")
    return statement.execution_options(**{PREPARED: name})


def _plan_of(sql: str, name: str = "statement") -> _Plan:
    """How a statement's text runs prepared: its parameters numbered in the PREPARE
    ($1, $2... by name), and given by name to the EXECUTE. A name given to a second
    text gets a number."""
    plan = _plans.get(sql)
    if plan is None:
        order: dict[str, int] = {}

        def number(found: re.Match[str]) -> str:
            if found.group(1) is None:
                return "%%"  # the PREPARE goes through the driver's formatting too
            return f"${order.setdefault(found.group(1), len(order) + 1)}"

        body = _PLACEHOLDER.sub(number, sql)
        with _naming:
            taken = sum(1 for known in _plans.values() if known.given == name)
            label = name if not taken else f"{name}_{taken + 1}"
            then = f"EXECUTE {label}" + (
                f"({', '.join(f'%({n})s' for n in order)})" if order else ""
            )
            plan = _plans.setdefault(sql, _Plan(label, body, then, name))
    return plan


def _preparing(execute: Callable[..., None]) -> Callable[..., None]:
    """Wrap a dialect's ``do_execute``: a statement marked ``prepared`` runs as EXECUTE,
    preparing it first on this connection in the same round trip (``PREPARE ...;
    EXECUTE ...``). A statement whose PREPARE may or may not have happened (its round
    trip failed), or whose prepared form cannot serve any more (``_STALE``), runs as
    sent on that connection from then on. (Wrapping the call, rather than listening for
    the engine's events, keeps the events' cost off every other statement and leaves
    errors to the engine as they come.) A prepared statement that cannot serve any more
    fails as an OperationalError, which the work's retry gets past."""

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        if (
            context is None
            or not isinstance(parameters, dict)
            or not context.execution_options.get(PREPARED)
        ):
            return execute(cursor, statement, parameters, context)
        plan = _plan_of(statement, context.execution_options[PREPARED])
        states: dict[str, bool] = context.root_connection.connection.info.setdefault(
            _ON_CONNECTION, {}
        )
        state = states.get(plan.name)
        if state is False:
            return execute(cursor, statement, parameters, context)
        try:
            execute(cursor, plan.then if state else plan.first, parameters, context)
        except BaseException as exc:
            stale = getattr(exc, "pgcode", None) in _STALE
            if stale or not state:
                states[plan.name] = False
            if stale:
                # Transient (config.faults): the work's retry runs the statement as sent.
                raise psycopg2.OperationalError(f"prepared statement {plan.name}: {exc}") from exc
            raise
        states[plan.name] = True
        return None

    return do_execute


#: What each open ``transaction`` asked to run after its commit.
_after_commit: WeakKeyDictionary[Connection, list[Callable[[], None]]] = WeakKeyDictionary()


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()``, then, once it has committed, what the work inside asked for
    with ``after_commit`` (a cache write-through). A failing callback is logged: the
    transaction stands, and what the callback kept fresh falls back on its own expiry.

    The error that ended the work is the one that leaves: nothing here touches the
    connection once it failed (a dropped connection stays an ``OperationalError``)."""
    callbacks: list[Callable[[], None]] = []
    with engine.begin() as conn:
        _after_commit[conn] = callbacks
        try:
            yield conn
        finally:
            _after_commit.pop(conn, None)
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.warning("an after-commit action failed", exc_info=True)


def after_commit(conn: Connection, callback: Callable[[], None]) -> None:
    """Run ``callback`` after the transaction of ``conn`` commits, if it was opened by
    ``transaction``; otherwise not at all (nothing waits for it)."""
    callbacks = _after_commit.get(conn)
    if callbacks is not None:
        callbacks.append(callback)


@contextmanager
def single_statements(engine: Engine) -> Iterator[Connection]:
    """A connection whose statements each run as their own transaction (the driver's
    autocommit): a lone read is one round trip instead of three (BEGIN, the read,
    ROLLBACK). For reads that need no snapshot shared with another statement: looking
    up a key, the newest event. The connection goes back to the pool as it came, in
    transactions."""
    with engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        assert driver is not None
        driver.autocommit = True
        try:
            yield conn
        finally:
            # Nothing was begun, so the rollback on the way back to the pool sends
            # nothing either. A connection that broke is discarded by the pool.
            with suppress(Exception):
                driver.autocommit = False
