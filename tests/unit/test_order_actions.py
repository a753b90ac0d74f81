"""Cancel and refund in the domain: REFUNDED follows CONFIRMED only and ends there; a
request's fingerprint tells a retry from another request."""

from __future__ import annotations

from uuid import uuid4

from orders.domain import TRANSITIONS, ActOnOrder, OrderAction, OrderStatus, statuses_before


def test_only_a_confirmed_order_becomes_refunded_and_nothing_follows() -> None:
    assert statuses_before(OrderStatus.REFUNDED) == {OrderStatus.CONFIRMED}
    assert TRANSITIONS[OrderStatus.REFUNDED] == frozenset()
    assert TRANSITIONS[OrderStatus.CANCELLED] == frozenset()


def test_a_fingerprint_names_the_action_and_the_order() -> None:
    order, other = uuid4(), uuid4()
    cancel = ActOnOrder(order, OrderAction.CANCEL, client="x", idempotency_key="k")
    again = ActOnOrder(order, OrderAction.CANCEL, client="x", idempotency_key="k")
    refund = ActOnOrder(order, OrderAction.REFUND, client="x", idempotency_key="k")
    elsewhere = ActOnOrder(other, OrderAction.CANCEL, client="x", idempotency_key="k")
    assert cancel.fingerprint() == again.fingerprint()
    assert len({cancel.fingerprint(), refund.fingerprint(), elsewhere.fingerprint()}) == 3
