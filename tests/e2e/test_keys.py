"""API keys made, listed and revoked with ``python -m orders.keys`` while the API runs:
gunicorn's workers honour each change from the next request on, with no restart."""

from __future__ import annotations

import subprocess
import sys

import httpx
from sqlalchemy import Engine

from config.settings import Settings
from tests.conftest import ROOT
from tests.harness.processes import Stack, process_env
from tests.helpers import add_customer


def keys_tool(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orders.keys", *args],
        cwd=ROOT,
        env=process_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_key_made_listed_and_revoked_with_the_tool_works_at_once(
    stack: Stack, settings: Settings, engine: Engine
) -> None:
    mine, other = add_customer(engine, limit="100.00"), add_customer(engine, limit="100.00")
    made = keys_tool(settings, "create", "--name", "shop front", "--customer", mine)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    key_id = key.split("_")[1]
    assert key not in made.stderr  # printed once, on stdout only

    listed = keys_tool(settings, "list")
    assert listed.returncode == 0, listed.stderr
    (line,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(key_id)]
    assert "shop front" in line and mine in line and "live" in line
    assert key.rsplit("_", 1)[1] not in listed.stdout  # never the secret

    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}) as http:
        # Many requests, so that both gunicorn workers serve some.
        assert {http.get(f"/customers/{mine}/credit").status_code for _ in range(20)} == {200}
        assert http.get(f"/customers/{other}/credit").status_code == 404

        revoked = keys_tool(settings, "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        assert {http.get(f"/customers/{mine}/credit").status_code for _ in range(20)} == {401}
    assert "revoked" in keys_tool(settings, "list").stdout.split(key_id, 1)[1].splitlines()[0]


def test_the_tool_refuses_a_customer_that_does_not_exist(settings: Settings) -> None:
    made = keys_tool(settings, "create", "--name", "x", "--customer", "NO-SUCH-CUSTOMER")
    assert made.returncode == 2
    assert "no such customers: NO-SUCH-CUSTOMER" in made.stderr
    assert made.stdout == ""
