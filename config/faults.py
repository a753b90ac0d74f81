"""Which failures pass with time (retry them) and which are final: decided here only.

A fault of the infrastructure is never an answer about an order. Every place that
retries, answers 503 or gives up asks ``is_transient``::

    Exception
     ├── transient: the same work, tried again later, can succeed
     │    ├── sqlalchemy.exc.OperationalError, InterfaceError   connection refused or
     │    │     dropped, server restarting (57P01 admin shutdown, 57P03 cannot connect
     │    │     now), too many connections (53300), deadlock (40P01), serialization
     │    │     failure (40001), lock timeout (55P03), statement timeout (57014)
     │    ├── any sqlalchemy.exc.DBAPIError whose connection was invalidated, or whose
     │    │     SQLSTATE is of class 08 (connection), 40 (rollback), 53 (resources),
     │    │     57P (operator intervention), or 25006 (read-only: a failover under way)
     │    ├── a prepared statement that cannot serve any more (config.database: a
     │    │     migration changed a column it returns, the session lost it, or a
     │    │     pooler's shared session holds its name), raised as an OperationalError;
     │    │     the retry runs the statement as sent
     │    ├── sqlalchemy.exc.TimeoutError                       no pooled connection free
     │    ├── sqlalchemy.exc.PendingRollbackError of a connection invalidated by its loss
     │    │     (error code 8s2b), and PendingRollbackError or ResourceClosedError raised
     │    │     while a transient fault was being handled
     │    ├── redis ConnectionError (BusyLoadingError too), TimeoutError, ReadOnlyError
     │    └── kombu.exceptions.OperationalError                 a message not published
     └── final: everything else (a constraint violation, a bug, bad data)
"""

from __future__ import annotations

from kombu.exceptions import OperationalError as BrokerOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    OperationalError,
    PendingRollbackError,
    ResourceClosedError,
    TimeoutError,
)

#: Transient by their class alone.
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    TimeoutError,
    RedisConnectionError,
    RedisTimeoutError,
    RedisReadOnlyError,
    BrokerOperationalError,
)
#: SQLSTATE prefixes of faults that pass: connection exceptions, transaction rollbacks
#: (serialization, deadlock), insufficient resources, operator intervention (shutdown,
#: restart, a cancelled statement), a lock not available, a read-only transaction.
_TRANSIENT_SQLSTATES = ("08", "40", "53", "57P", "57014", "55P03", "25006")
#: Raised by SQLAlchemy when a connection broke under the work that was going on: they
#: are transient when what they interrupted was.
_AFTERMATH = (PendingRollbackError, ResourceClosedError)
#: SQLAlchemy's code for "Can't reconnect until invalid transaction is rolled back": a
#: transaction whose connection was invalidated, which only a lost connection does.
_INVALIDATED_TRANSACTION = "8s2b"


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault of the infrastructure that passes with time."""
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        code = getattr(exc.orig, "pgcode", None) or ""
        return code.startswith(_TRANSIENT_SQLSTATES)
    if isinstance(exc, PendingRollbackError) and exc.code == _INVALIDATED_TRANSACTION:
        return True
    if isinstance(exc, _AFTERMATH):
        cause = exc.__cause__ or exc.__context__
        return cause is not None and is_transient(cause)
    return False
