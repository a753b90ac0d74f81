"""The credit check's findings, readable: the operators' endpoint and the batch command line
list the customers the latest reviews flagged, and why, a page at a time."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import pytest
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy import Engine, delete, insert

from config.settings import Settings
from orders.api import create_app
from orders.credit_review import review_customers
from orders.saga import DEFINITIONS
from orders.tables import credit_reviews, customers
from tests.conftest import ADMIN_KEY, API_KEY, ROOT
from tests.fakes import RecordingLauncher
from workers.admin import Operations
from workers.celery_app import create_celery

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def reviewed(engine: Engine) -> Iterator[str]:
    """Four customers of one prefix, reviewed: -0 in order, -1 over its limit, -2 with
    credit reserved but no open order, -3 both. Yields the prefix (it sorts before them)."""
    prefix = f"FIND-{uuid4().hex[:10]}-"
    figures = {
        "0": ("100.00", "0.00", "0.00"),
        "1": ("50.00", "0.00", "60.00"),  # reserved past the limit (and no open order)
        "2": ("100.00", "0.00", "10.00"),
        "3": ("10.00", "20.00", "0.00"),  # used past the limit, no confirmed order
    }
    ids = [prefix + n for n in figures]
    with engine.begin() as conn:
        conn.execute(
            insert(customers),
            [
                {
                    "id": prefix + n,
                    "name": "findings",
                    "credit_limit": Decimal(limit),
                    "credit_used": Decimal(used),
                    "credit_reserved": Decimal(reserved),
                }
                for n, (limit, used, reserved) in figures.items()
            ],
        )
        review_customers(conn, ids, uuid4(), datetime.now(UTC))
    yield prefix
    with engine.begin() as conn:
        conn.execute(delete(credit_reviews).where(credit_reviews.c.customer_id.in_(ids)))
        conn.execute(delete(customers).where(customers.c.id.in_(ids)))


@pytest.fixture
def client(engine: Engine, settings: Settings) -> FlaskClient:
    publisher: Celery = create_celery(settings, publisher=True)
    operations = Operations(engine, publisher, settings, DEFINITIONS)
    app = create_app(settings, starter=RecordingLauncher(), engine=engine, operations=operations)
    return app.test_client()


def test_the_endpoint_pages_through_the_flagged_customers_and_says_why(
    client: FlaskClient, reviewed: str
) -> None:
    first = client.get(f"/admin/credit-reviews?limit=2&after={reviewed}", headers=ADMIN)
    assert first.status_code == 200 and first.mimetype == "application/json"
    page = first.json
    assert [r["customer_id"] for r in page["credit_reviews"]] == [reviewed + "1", reviewed + "2"]
    over, drifted = page["credit_reviews"]
    assert over["flagged"] and over["over_limit"] and over["inconsistent"]
    assert (over["credit_limit"], over["credit_reserved"], over["available"]) == (
        "50.00",
        "60.00",
        "-10.00",
    )
    assert drifted["findings"] == ["credit reserved 10.00 but open orders total only 0.00"]
    assert not drifted["over_limit"]
    assert page["next"] == f"/admin/credit-reviews?flagged=true&limit=2&after={reviewed}2"

    following = client.get(page["next"], headers=ADMIN).json["credit_reviews"]
    assert following[0]["customer_id"] == reviewed + "3"
    (used,) = following[0]["findings"]
    assert used.startswith("credit used 20.00 but confirmed orders total 0")

    # Every review, flagged or not: the customer in order comes first.
    every = client.get(
        f"/admin/credit-reviews?flagged=false&limit=1&after={reviewed}", headers=ADMIN
    )
    (fine,) = every.json["credit_reviews"]
    assert fine["customer_id"] == reviewed + "0" and not fine["flagged"] and fine["findings"] == []
    assert every.json["next"].endswith(f"after={reviewed}0")


def test_the_endpoint_is_an_operators_and_refuses_a_bad_query_as_a_problem(
    client: FlaskClient,
) -> None:
    assert client.get("/admin/credit-reviews").status_code == 401
    client_key = {"Authorization": f"Bearer {API_KEY}"}
    assert client.get("/admin/credit-reviews", headers=client_key).status_code == 403
    bad = ("limit=0", "limit=1001", "limit=x", "flagged=maybe", "after=%00", "after=" + "a" * 201)
    for query in bad:
        answer = client.get(f"/admin/credit-reviews?{query}", headers=ADMIN)
        assert answer.status_code == 400, query
        assert answer.mimetype == "application/problem+json", query


def test_the_dead_letter_state_filter_takes_either_case_and_replay_errors_are_not_orders(
    client: FlaskClient,
) -> None:
    for state in ("open", "OPEN", "Purged"):
        assert client.get(f"/admin/dead-letters?state={state}", headers=ADMIN).status_code == 200
    assert client.get("/admin/dead-letters?state=closed", headers=ADMIN).status_code == 400
    invalid = client.post("/admin/dead-letters/replay", headers=ADMIN, json={"ids": ["x"]})
    assert invalid.status_code == 422 and invalid.mimetype == "application/problem+json"
    assert invalid.json["title"] == "Invalid request"


def test_the_command_line_lists_the_findings_reading_make_runs_settings(
    reviewed: str, settings: Settings, tmp_path: Path
) -> None:
    # As `make run` leaves it: nothing to source, the tool reads RUN_DIR/env.
    (tmp_path / "env").write_text(f"DATABASE_URL={settings.database_url}\n")

    def findings(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers.batch", "findings", *arguments],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "RUN_DIR": str(tmp_path), "LANG": "C.UTF-8"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = findings("--after", reviewed, "--limit", "2")
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["customer_id"] for r in lines] == [reviewed + "1", reviewed + "2"]
    assert f"--after {reviewed}2" in listed.stderr  # how to read on
    every = findings("--all", "--after", reviewed, "--limit", "1")
    assert json.loads(every.stdout)["customer_id"] == reviewed + "0"
    refused = findings("--limit", "0")
    assert refused.returncode == 2 and "from 1 to 1000" in refused.stderr
