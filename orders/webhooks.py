"""Webhook endpoints: where a client (an API key) wants the final states of its orders
POSTed, the secret each delivery is signed with, and how receivers check it.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com/), the scheme of
Svix and many others: a delivery carries ``webhook-id`` (the event's stable id, to
deduplicate on), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``, which
is ``v1,`` and the base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` keyed by the
endpoint's secret (``whsec_`` and the base64 of 32 random bytes). After a rotation the
previous secret signs too, for a grace period: two signatures, separated by a space;
either verifies. The spec's reference library (``standardwebhooks``) signs and
verifies, so any receiver using one of its libraries checks what we send.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from sqlalchemy import Engine, func, select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from orders.tables import webhook_endpoints

_w = webhook_endpoints.c

#: Longest URL an endpoint may have.
MAX_URL = 2048
#: Endpoints one key may have at a time.
MAX_ENDPOINTS = 10
#: Where the secret's key starts (Standard Webhooks).
SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
#: Environments where a receiver may be plain http (and on this machine).
PLAIN_HTTP_ENVIRONMENTS = frozenset({"local", "test"})
#: Names of cloud metadata services, refused like their addresses.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
#: What an endpoint URL looks like: a scheme, a host name or IPv4 address, a port, a
#: path (and query) of visible ASCII; no user or password, no IPv6 literal.
URL_SHAPE = rf"^SCHEMES://{_LABEL}(?:\.{_LABEL})*(?::{_PORT})?(?:/[!-~]*)?$"


def url_pattern(env: str) -> str:
    """The pattern of an endpoint URL in this environment (plain http only locally)."""
    schemes = "https?" if env in PLAIN_HTTP_ENVIRONMENTS else "https"
    return URL_SHAPE.replace("SCHEMES", schemes, 1)


class WebhookError(Exception):
    """A webhook request that cannot be done."""


class InvalidWebhookUrlError(WebhookError):
    """The URL may not receive webhooks (scheme, host, address); the message says why."""


class TooManyEndpointsError(WebhookError):
    """The key has MAX_ENDPOINTS endpoints already."""


@dataclass(frozen=True)
class Endpoint:
    """An endpoint as its client sees it (the secret only when it was just made)."""

    id: UUID
    url: str
    created_at: datetime
    previous_expires_at: datetime | None = None
    secret: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready primitives; the secret only when there is one to show."""
        data: dict[str, Any] = {
            "id": str(self.id),
            "url": self.url,
            "created_at": self.created_at.isoformat(),
            "previous_secret_expires_at": (
                self.previous_expires_at.isoformat() if self.previous_expires_at else None
            ),
        }
        if self.secret is not None:
            data["secret"] = self.secret
        return data


def new_secret() -> str:
    """A new endpoint secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_url(url: str, env: str) -> str:
    """The URL, if webhooks may be sent to it; InvalidWebhookUrlError says why not.

    http and https only, https outside APP_ENV local and test; a host name or IPv4
    address, no user or password (``url_pattern``). Against requests to what only the
    server can reach (SSRF): link-local addresses (169.254.0.0/16 and fe80::/10, where
    cloud metadata services answer) and their names are refused everywhere, and
    loopback and unspecified addresses outside local and test. The sender checks the addresses a
    name resolves to again before each attempt (workers.webhooks)."""
    if len(url) > MAX_URL:
        raise InvalidWebhookUrlError(f"a URL is at most {MAX_URL} characters")
    if any(ord(ch) <= 32 or ord(ch) == 127 for ch in url):
        raise InvalidWebhookUrlError("a URL holds no spaces or control characters")
    scheme = url.partition("://")[0].lower()
    if scheme not in ("https", "http"):
        raise InvalidWebhookUrlError("the URL's scheme must be https (or http, locally)")
    if scheme == "http" and env not in PLAIN_HTTP_ENVIRONMENTS:
        raise InvalidWebhookUrlError("the URL's scheme must be https")
    if not re.fullmatch(url_pattern(env), url):
        raise InvalidWebhookUrlError(
            "a URL is scheme://host[:port][/path]: a host name or IPv4 address, a port"
            " from 1 to 65535, no user or password"
        )
    host = urlsplit(url).hostname or ""
    if host.lower() in METADATA_HOSTS:
        raise InvalidWebhookUrlError("a cloud metadata service cannot receive webhooks")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return url
    refusal = refused_address(address, env)
    if refusal:
        raise InvalidWebhookUrlError(refusal)
    return url


def refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, env: str) -> str:
    """Why webhooks may not go to this address ("" if they may)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_link_local:
        return f"{address} is link-local (where cloud metadata services answer)"
    if env not in PLAIN_HTTP_ENVIRONMENTS and (address.is_loopback or address.is_unspecified):
        return f"{address} is this machine"
    return ""


def signature_headers(event_id: str, body: str, signing: list[str], at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: one signature per secret in
    ``signing`` (the current one first)."""
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(
            Webhook(secret).sign(event_id, at, body) for secret in signing
        ),
    }


def verify(secret: str, body: bytes | str, headers: Mapping[str, str]) -> bool:
    """Whether ``headers`` sign ``body`` with ``secret`` (a receiver's check, with the
    spec's 5 minutes of tolerance on the timestamp)."""
    try:
        Webhook(secret).verify(body, dict(headers), json_parse=False)
    except (WebhookVerificationError, ValueError):
        return False
    return True


def _endpoint(row: Any, secret: str | None = None) -> Endpoint:
    expires = row.previous_expires_at
    if expires is not None and expires <= datetime.now(UTC):
        expires = None
    return Endpoint(row.id, row.url, row.created_at, expires, secret)


_ACTIVE = _w.disabled_at.is_(None)


def create_endpoint(engine: Engine, key_id: str, url: str) -> Endpoint:
    """Register ``url`` (checked already) for the key; the answer holds the secret."""
    secret = new_secret()
    with engine.begin() as conn:
        # One registration of a key at a time: the count below stays true.
        conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"webhooks:{key_id}"))))
        count = conn.execute(
            select(func.count()).select_from(webhook_endpoints).where(_w.key_id == key_id, _ACTIVE)
        ).scalar_one()
        if count >= MAX_ENDPOINTS:
            raise TooManyEndpointsError(f"a key has at most {MAX_ENDPOINTS} endpoints")
        row = conn.execute(
            webhook_endpoints.insert()
            .values(
                id=uuid.uuid4(),
                key_id=key_id,
                url=url,
                secret=secret,
                created_at=datetime.now(UTC),
            )
            .returning(_w.id, _w.url, _w.created_at, _w.previous_expires_at)
        ).one()
    return _endpoint(row, secret)


def list_endpoints(engine: Engine, key_id: str) -> list[Endpoint]:
    """The key's endpoints, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(_w.id, _w.url, _w.created_at, _w.previous_expires_at)
            .where(_w.key_id == key_id, _ACTIVE)
            .order_by(_w.created_at, _w.id)
        ).all()
    return [_endpoint(row) for row in rows]


def delete_endpoint(engine: Engine, key_id: str, endpoint_id: UUID) -> bool:
    """Stop sending to the endpoint (its deliveries and their log are kept); False when
    the key has no such endpoint."""
    with engine.begin() as conn:
        done = conn.execute(
            update(webhook_endpoints)
            .where(_w.id == endpoint_id, _w.key_id == key_id, _ACTIVE)
            .values(disabled_at=datetime.now(UTC))
        )
    return done.rowcount == 1


def rotate_secret(
    engine: Engine, key_id: str, endpoint_id: UUID, grace: timedelta
) -> Endpoint | None:
    """Give the endpoint a new secret; the current one signs too until ``grace`` has
    passed. None when the key has no such endpoint."""
    secret = new_secret()
    now = datetime.now(UTC)
    with engine.begin() as conn:
        row = conn.execute(
            update(webhook_endpoints)
            .where(_w.id == endpoint_id, _w.key_id == key_id, _ACTIVE)
            .values(
                previous_secret=_w.secret,
                previous_expires_at=now + grace,
                secret=secret,
            )
            .returning(_w.id, _w.url, _w.created_at, _w.previous_expires_at)
        ).first()
    return None if row is None else _endpoint(row, secret)


def signing_secrets(
    secret: str, previous: str | None, previous_expires_at: datetime | None, now: datetime
) -> list[str]:
    """The secrets that sign a delivery now: the current one, and the previous one
    during its grace period."""
    if previous and previous_expires_at is not None and previous_expires_at > now:
        return [secret, previous]
    return [secret]
