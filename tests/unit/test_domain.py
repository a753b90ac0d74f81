"""Money and the order command."""

from __future__ import annotations

from decimal import Decimal

from orders.domain import OrderLine, PlaceOrder, money, order_total


def test_money_has_two_places_rounded_half_even() -> None:
    assert money("1.005") == Decimal("1.00")
    assert money("1.015") == Decimal("1.02")
    assert str(money(3)) == "3.00"


def test_order_total_is_exact() -> None:
    lines = (OrderLine("A", 3), OrderLine("B", 1))
    assert order_total(lines, {"A": Decimal("0.10"), "B": Decimal("0.20")}) == Decimal("0.50")


def test_a_fingerprint_tells_a_retry_from_another_request() -> None:
    one = PlaceOrder("C", (OrderLine("A", 1),), client="x", idempotency_key="k")
    same = PlaceOrder("C", (OrderLine("A", 1),), client="x", idempotency_key="k")
    other = PlaceOrder("C", (OrderLine("A", 2),), client="x", idempotency_key="k")
    assert one.fingerprint() == same.fingerprint() != other.fingerprint()
