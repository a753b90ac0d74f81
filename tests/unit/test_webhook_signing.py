"""Webhook signatures are Standard Webhooks' (the spec's own test vector), rotation signs
with both secrets, and endpoint URLs that could reach what only the server can are
refused."""

from __future__ import annotations

import ipaddress
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from config import names
from config.celeryconf import celery_config
from config.settings import ConfigError, Settings, load_settings
from orders import webhooks
from orders.webhook_deliveries import FINAL_EVENTS, Claimed, event_id
from workers.base import retry_delay
from workers.webhooks import attempt

#: The example of the Standard Webhooks libraries' tests.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
BODY = '{"test": 2432232314}'
SIGNED_AT = datetime.fromtimestamp(1614265330, UTC)
EXPECTED = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signs_as_the_standard_webhooks_test_vector() -> None:
    headers = webhooks.signature_headers(MSG_ID, BODY, [SECRET], SIGNED_AT)

    assert headers == {
        "webhook-id": MSG_ID,
        "webhook-timestamp": "1614265330",
        "webhook-signature": EXPECTED,
    }


def test_a_receiver_verifies_a_fresh_signature_and_nothing_forged() -> None:
    now = datetime.now(UTC)
    headers = webhooks.signature_headers("evt_1", BODY, [SECRET], now)

    assert webhooks.verify(SECRET, BODY.encode(), headers)
    assert not webhooks.verify(SECRET, BODY.replace("2", "3"), headers)
    assert not webhooks.verify(webhooks.new_secret(), BODY, headers)
    assert not webhooks.verify(SECRET, BODY, {**headers, "webhook-id": "evt_2"})
    assert not webhooks.verify(SECRET, BODY, {**headers, "webhook-signature": "v1,bm90"})
    assert not webhooks.verify(SECRET, BODY, {**headers, "webhook-signature": "garbage"})
    stale = webhooks.signature_headers("evt_1", BODY, [SECRET], now - timedelta(minutes=6))
    assert not webhooks.verify(SECRET, BODY, stale)


def test_after_a_rotation_both_secrets_sign_until_the_old_one_expires() -> None:
    new, old = webhooks.new_secret(), SECRET
    now = datetime.now(UTC)
    signing = webhooks.signing_secrets(new, old, now + timedelta(hours=1), now)
    headers = webhooks.signature_headers("evt_1", BODY, signing, now)

    assert len(headers["webhook-signature"].split(" ")) == 2
    assert webhooks.verify(new, BODY, headers) and webhooks.verify(old, BODY, headers)
    assert webhooks.signing_secrets(new, old, now - timedelta(seconds=1), now) == [new]


def test_secrets_are_32_random_bytes_in_the_whsec_form() -> None:
    first, second = webhooks.new_secret(), webhooks.new_secret()

    assert first.startswith("whsec_") and len(first) == len("whsec_") + 44
    assert first != second


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "fe80::1", "::ffff:169.254.169.254", "169.254.0.1"]
)
def test_link_local_addresses_are_refused_in_every_environment(address: str) -> None:
    for env in ("test", "production"):
        assert webhooks.refused_address(ipaddress.ip_address(address), env)


def test_loopback_is_refused_outside_local_and_test() -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    assert webhooks.refused_address(loopback, "production")
    assert not webhooks.refused_address(loopback, "test")
    assert not webhooks.refused_address(ipaddress.ip_address("10.1.2.3"), "production")


def test_the_sender_refuses_a_name_that_resolves_to_a_metadata_address() -> None:
    claimed = Claimed(
        id=uuid.uuid4(),
        event_id="evt_1",
        payload={},
        attempts=0,
        replayed=False,
        url="https://innocent.example/hook",
        secret=SECRET,
        previous_secret=None,
        previous_expires_at=None,
    )

    def resolver(host: str) -> list[str]:
        return ["169.254.169.254"]

    got = attempt(None, claimed, "production", resolver)  # type: ignore[arg-type]

    assert got.status_code is None
    assert got.error is not None and "link-local" in got.error


def test_event_ids_are_stable_per_order_and_seq() -> None:
    order = uuid.UUID(int=7)
    assert event_id(order, 2) == event_id(order, 2) == f"evt_{order.hex}_2"
    assert event_id(order, 3) != event_id(order, 2)


def test_every_final_state_is_announced_refunds_included() -> None:
    kinds = {kind for kind, _ in FINAL_EVENTS.values()}
    assert kinds == {
        "order.confirmed",
        "order.cancelled",
        "order.compensation_failed",
        "order.refunded",
    }


def test_retries_back_off_exponentially_up_to_the_cap_with_jitter() -> None:
    random.seed(1)
    delays = [retry_delay(n, base=30.0, cap=3600.0) for n in range(10)]

    for n, delay in enumerate(delays):
        step = min(3600.0, 30.0 * 2**n)
        assert step / 2 <= delay <= step
    assert max(delays) <= 3600.0


def test_beat_sends_the_due_deliveries_on_the_webhooks_lane_only() -> None:
    config = celery_config(Settings(webhook_poll_seconds=2.0))
    entry = config["beat_schedule"]["send-webhooks"]

    assert entry["task"] == names.SEND_WEBHOOKS
    assert entry["schedule"] == 2.0
    assert config["task_routes"][names.SEND_WEBHOOKS] == {"queue": "webhooks"}
    assert Settings(webhooks_queue="hooks").queue(names.Lane.WEBHOOKS) == "hooks"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WEBHOOK_MAX_ATTEMPTS": "0"}, "WEBHOOK_MAX_ATTEMPTS"),
        ({"WEBHOOK_TIMEOUT_SECONDS": "0"}, "WEBHOOK_TIMEOUT_SECONDS"),
        ({"WEBHOOK_BACKOFF_MAX_SECONDS": "1"}, "WEBHOOK_BACKOFF_MAX_SECONDS"),
        ({"WEBHOOKS_LANE": "saga.high"}, "distinct"),
    ],
)
def test_refuses_webhook_settings_that_cannot_work(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ)
