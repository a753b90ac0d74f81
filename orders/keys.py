"""API keys: who may call the API, in which role, for which customers.

A key reads ``osk_<id>_<secret>``. The id is public (it names the key in listings, logs
and the idempotency scope); the secret is 32 random bytes. Only the sha256 of the whole
key is stored, so the table never holds a usable key. A key is made for a named client
with a role (``client``: the order endpoints; ``operator``: also ``/admin`` and
``/batches``) and the customers it may act for, or every customer (a trusted back end).

Every request looks its key up (one primary-key read): a revoked key is refused from the
next request on, in every process, with nothing to restart.

``python -m orders.keys``::

    create --name NAME (--customer ID ... | --all-customers) [--role client|operator]
    list
    revoke KEY_ID
    demo --out FILE     (make run: a key per demo customer, an all-customers key and an
                         operator key, written once to FILE, mode 600)
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from sqlalchemy import Connection, Engine, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError

from config.database import prepared, single_statements
from orders.tables import api_keys, customers

PREFIX = "osk"
#: The SQLSTATE of a privilege refused.
INSUFFICIENT_PRIVILEGE = "42501"
#: A key as presented: ``osk_<id>_<secret>``.
_KEY = re.compile(r"^osk_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")


#: A valid key's record, by its id.
_LOOKUP = prepared(
    "api_key",
    select(api_keys.c.name, api_keys.c.role, api_keys.c.customers, api_keys.c.secret_hash)
    .where(api_keys.c.id == bindparam("key_id"))
    .where(api_keys.c.revoked_at.is_(None)),
)


class Role(StrEnum):
    """What a key may do."""

    CLIENT = "client"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Principal:
    """The holder of a valid key, as a request sees it."""

    key_id: str
    name: str
    role: Role
    #: The customers it may act for; None: every customer.
    customers: frozenset[str] | None

    def may_act_for(self, customer_id: str) -> bool:
        """Whether this key may read or act for ``customer_id``."""
        return self.customers is None or customer_id in self.customers

    @property
    def is_operator(self) -> bool:
        return self.role is Role.OPERATOR


@dataclass(frozen=True)
class KeyRecord:
    """A key as listed (never its secret)."""

    key_id: str
    name: str
    role: str
    customers: tuple[str, ...] | None
    created_at: datetime
    revoked_at: datetime | None


class UnknownCustomersError(ValueError):
    """A key was asked for customers that do not exist."""


def digest(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The public id of a well-formed key, else None."""
    found = _KEY.match(key)
    return found.group(1) if found else None


def authenticate(engine: Engine, key: str) -> Principal | None:
    """The principal of a valid, unrevoked key; None for anything else."""
    key_id = key_id_of(key)
    if key_id is None:
        return None
    with single_statements(engine) as conn:  # one round trip: every request pays it
        row = conn.execute(_LOOKUP, {"key_id": key_id}).first()
    if row is None or not hmac.compare_digest(row.secret_hash, digest(key)):
        return None
    scope = None if row.customers is None else frozenset(row.customers)
    return Principal(key_id, row.name, Role(row.role), scope)


def create(
    conn: Connection,
    name: str,
    *,
    role: Role = Role.CLIENT,
    customer_ids: Iterable[str] | None = None,
) -> tuple[str, str]:
    """Make a key; return its id and the key itself (shown once, never stored).
    ``customer_ids`` None: every customer."""
    name = name.strip()
    if not 0 < len(name) <= 100:
        raise ValueError("a key's name is 1 to 100 characters")
    _check_scope(role, customer_ids)
    scope = None
    if customer_ids is not None:
        scope = sorted(set(customer_ids))
        if not scope:
            raise ValueError("name at least one customer, or every customer")
        known = set(conn.execute(select(customers.c.id).where(customers.c.id.in_(scope))).scalars())
        if missing := [c for c in scope if c not in known]:
            raise UnknownCustomersError(f"no such customers: {', '.join(missing)}")
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    conn.execute(
        insert(api_keys).values(
            id=key_id, name=name, role=role.value, customers=scope, secret_hash=digest(key)
        )
    )
    return key_id, key


def add_known_key(
    conn: Connection,
    key: str,
    name: str,
    *,
    role: Role = Role.CLIENT,
    customer_ids: Sequence[str] | None = None,
) -> str:
    """Register a key made elsewhere (``osk_<id>_<secret>``); return its id. For tests
    and provisioning that must know the key in advance."""
    key_id = key_id_of(key)
    if key_id is None:
        raise ValueError("not a key of the form osk_<12 lowercase letters or digits>_<secret>")
    _check_scope(role, customer_ids)
    conn.execute(
        insert(api_keys)
        .values(
            id=key_id,
            name=name,
            role=role.value,
            customers=None if customer_ids is None else sorted(set(customer_ids)),
            secret_hash=digest(key),
        )
        .on_conflict_do_nothing()
    )
    return key_id


def _check_scope(role: Role, customer_ids: Iterable[str] | None) -> None:
    if role is Role.OPERATOR and customer_ids is not None:
        raise ValueError(
            "an operator's key acts for every customer (the dead letters, batch runs and"
            " credit checks it reaches span them all)"
        )


def revoke(conn: Connection, key_id: str) -> bool:
    """Revoke a key from the next request on; False when there is no such live key."""
    done = conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id)
        .where(api_keys.c.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return done.rowcount == 1


def listing(conn: Connection) -> list[KeyRecord]:
    """Every key, newest first."""
    rows = conn.execute(
        select(
            api_keys.c.id,
            api_keys.c.name,
            api_keys.c.role,
            api_keys.c.customers,
            api_keys.c.created_at,
            api_keys.c.revoked_at,
        ).order_by(api_keys.c.created_at.desc(), api_keys.c.id)
    ).all()
    return [
        KeyRecord(
            r.id,
            r.name,
            r.role,
            None if r.customers is None else tuple(r.customers),
            r.created_at,
            r.revoked_at,
        )
        for r in rows
    ]


def demo_keys(engine: Engine, out: Path, customer_ids: Sequence[str]) -> bool:
    """Make the local run's keys once: one per demo customer, one for every customer
    and one operator key, written to ``out`` (mode 600). Nothing happens while ``out``
    holds keys that still work; returns whether keys were made."""
    if out.is_file():
        try:
            held = json.loads(out.read_text())
            wanted = [held["all_customers"], held["operator"], *held["customers"].values()]
            if all(authenticate(engine, key) for key in wanted):
                return False
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable: make new ones
    with engine.begin() as conn:
        made = {
            "all_customers": create(conn, "demo: every customer")[1],
            "operator": create(conn, "demo: operator", role=Role.OPERATOR)[1],
            "customers": {c: create(conn, f"demo: {c}", customer_ids=[c])[1] for c in customer_ids},
        }
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(made, file, indent=2)
    out.chmod(0o600)
    return True


def _main(argv: Sequence[str] | None = None) -> int:
    from config.cli import ToolSettings
    from config.database import make_engine

    parser = argparse.ArgumentParser(
        prog="python -m orders.keys", description="Create, list and revoke API keys."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("create", help="make a key; it is printed once, on stdout")
    made.add_argument("--name", required=True, help="who holds it (a client, a service)")
    scope = made.add_mutually_exclusive_group(required=True)
    scope.add_argument("--customer", action="append", help="a customer it may act for")
    scope.add_argument("--all-customers", action="store_true", help="every customer")
    made.add_argument("--role", choices=[r.value for r in Role], default=Role.CLIENT.value)
    commands.add_parser("list", help="every key: id, name, role, customers, state")
    gone = commands.add_parser("revoke", help="refuse a key from the next request on")
    gone.add_argument("key_id")
    demo = commands.add_parser("demo", help="the local run's demo keys, into a private file")
    demo.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    # As the schema's owner: the system's own role may only read keys. Under make run,
    # .run/owner.env names it; elsewhere DATABASE_URL must.
    tool = ToolSettings.checked(broker=False, owner=True)
    if tool is None:
        return 1
    engine = make_engine(tool.settings, application_name="orders-keys")
    try:
        return _command(engine, args)
    except DBAPIError as exc:
        if getattr(exc.orig, "pgcode", None) != INSUFFICIENT_PRIVILEGE:
            return tool.report(exc)
        print(
            "error: this database role may only read API keys; connect as the schema's"
            " owner (DATABASE_URL, as for the migrations)",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # a server lost meanwhile: say so plainly
        return tool.report(exc)
    finally:
        engine.dispose()


def _command(engine: Engine, args: argparse.Namespace) -> int:
    if args.command == "create":
        try:
            with engine.begin() as conn:
                key_id, key = create(
                    conn,
                    args.name,
                    role=Role(args.role),
                    customer_ids=None if args.all_customers else args.customer,
                )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"made key {key_id} ({args.role}); it is shown this once:", file=sys.stderr)
        print(key)
        return 0
    if args.command == "list":
        with engine.connect() as conn:
            for rec in listing(conn):
                scope = "every customer" if rec.customers is None else ",".join(rec.customers)
                state = f"revoked {rec.revoked_at:%Y-%m-%d %H:%M}" if rec.revoked_at else "live"
                print(f"{rec.key_id}  {rec.role:<8}  {state:<22}  {rec.name}  [{scope}]")
        return 0
    if args.command == "revoke":
        with engine.begin() as conn:
            done = revoke(conn, args.key_id)
        print(f"revoked {args.key_id}" if done else f"no live key {args.key_id}", file=sys.stderr)
        return 0 if done else 1
    from orders.demo import CUSTOMERS

    made = demo_keys(engine, args.out, [str(c["id"]) for c in CUSTOMERS])
    print(f"demo keys {'written to' if made else 'kept in'} {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
