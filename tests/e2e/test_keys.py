"""API keys made, listed and revoked with ``python -m orders.keys`` while the API runs:
gunicorn's workers honour each change from the next request on, with no restart."""

from __future__ import annotations

import subprocess
import sys

import httpx
from sqlalchemy import Engine

from config.settings import Settings
from tests.conftest import ROOT, Servers
from tests.harness.processes import Stack, process_env
from tests.helpers import add_customer


def keys_tool(
    settings: Settings, servers: Servers, *args: str, role: str = "owner"
) -> subprocess.CompletedProcess[str]:
    """``python -m orders.keys`` as the schema's owner (or ``role``)."""
    return subprocess.run(
        [sys.executable, "-m", "orders.keys", *args],
        cwd=ROOT,
        env=process_env(settings, DATABASE_URL=servers.postgres.url(role=role)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_key_made_listed_and_revoked_with_the_tool_works_at_once(
    stack: Stack, settings: Settings, servers: Servers, engine: Engine
) -> None:
    mine, other = add_customer(engine, limit="100.00"), add_customer(engine, limit="100.00")
    made = keys_tool(settings, servers, "create", "--name", "shop front", "--customer", mine)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    key_id = key.split("_")[1]
    assert key not in made.stderr  # printed once, on stdout only

    listed = keys_tool(settings, servers, "list")
    assert listed.returncode == 0, listed.stderr
    (line,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(key_id)]
    assert "shop front" in line and mine in line and "live" in line
    assert key.rsplit("_", 1)[1] not in listed.stdout  # never the secret

    # A new connection for each request (Connection: close), so both gunicorn workers
    # answer some of them.
    headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
    with httpx.Client(base_url=stack.api_url, headers=headers) as http:
        assert {http.get(f"/customers/{mine}/credit").status_code for _ in range(20)} == {200}
        assert http.get(f"/customers/{other}/credit").status_code == 404

        revoked = keys_tool(settings, servers, "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        assert {http.get(f"/customers/{mine}/credit").status_code for _ in range(20)} == {401}
    listed_after = keys_tool(settings, servers, "list").stdout
    assert "revoked" in listed_after.split(key_id, 1)[1].splitlines()[0]


def test_the_tool_refuses_a_customer_that_does_not_exist(
    settings: Settings, servers: Servers
) -> None:
    made = keys_tool(settings, servers, "create", "--name", "x", "--customer", "NO-SUCH-CUSTOMER")
    assert made.returncode == 2
    assert "no such customers: NO-SUCH-CUSTOMER" in made.stderr
    assert made.stdout == ""


def test_the_systems_own_role_cannot_make_a_key(
    settings: Settings, servers: Servers, engine: Engine
) -> None:
    customer = add_customer(engine, limit="1.00")
    made = keys_tool(settings, servers, "create", "--name", "x", "--customer", customer, role="app")
    assert made.returncode == 1
    assert "may only read API keys" in made.stderr and "Traceback" not in made.stderr
    assert made.stdout == ""
