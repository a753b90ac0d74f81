"""Stock and credit change atomically; racing reservations never oversell or overspend."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from orders import credit, inventory
from tests.helpers import Credit, Stock, add_customer, add_product, credit_of, stock_of


def test_reserve_and_release_move_stock_exactly(engine: Engine) -> None:
    a, b = add_product(engine, on_hand=10), add_product(engine, on_hand=4)
    with engine.begin() as conn:
        assert inventory.reserve_stock(conn, [(a, 3), (b, 4)])
    assert (stock_of(engine, a), stock_of(engine, b)) == (Stock(10, 3), Stock(4, 4))
    with engine.begin() as conn:
        inventory.release_stock(conn, [(a, 1), (b, 4)])
    assert (stock_of(engine, a), stock_of(engine, b)) == (Stock(10, 2), Stock(4, 0))


def test_reserves_all_lines_or_none(engine: Engine) -> None:
    plenty, scarce = add_product(engine, on_hand=10), add_product(engine, on_hand=1)
    with engine.begin() as conn:
        assert not inventory.reserve_stock(conn, [(plenty, 2), (scarce, 2)])
    assert stock_of(engine, plenty) == Stock(10, 0)
    assert stock_of(engine, scarce) == Stock(1, 0)


def test_a_constraint_stops_stock_going_negative_even_when_code_is_wrong(engine: Engine) -> None:
    product = add_product(engine, on_hand=1)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        inventory.release_stock(conn, [(product, 1)])
    assert stock_of(engine, product) == Stock(1, 0)


def test_twenty_racing_reservations_of_five_units_get_exactly_five(engine: Engine) -> None:
    product = add_product(engine, on_hand=5)

    def reserve_one(_: int) -> bool:
        with engine.begin() as conn:
            return inventory.reserve_stock(conn, [(product, 1)])

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(reserve_one, range(20)))
    assert results.count(True) == 5
    assert stock_of(engine, product) == Stock(5, 5)


def test_multi_line_orders_locking_in_opposite_orders_do_not_deadlock(engine: Engine) -> None:
    a, b = add_product(engine, on_hand=100), add_product(engine, on_hand=100)

    def reserve(n: int) -> bool:
        lines = [(a, 1), (b, 1)] if n % 2 else [(b, 1), (a, 1)]
        with engine.begin() as conn:
            return inventory.reserve_stock(conn, lines)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(reserve, range(40)))
    assert stock_of(engine, a) == stock_of(engine, b) == Stock(100, 40)


def test_credit_moves_exactly(engine: Engine) -> None:
    customer = add_customer(engine, limit="100.00")
    with engine.begin() as conn:
        assert credit.reserve_credit(conn, customer, Decimal("60.00"))
        assert not credit.reserve_credit(conn, customer, Decimal("40.01"))
    with engine.begin() as conn:
        credit.release_credit(conn, customer, Decimal("35.00"))
    assert credit_of(engine, customer) == Credit(
        Decimal("100.00"), Decimal("0.00"), Decimal("25.00")
    )


def test_twenty_racing_credit_reservations_never_pass_the_limit(engine: Engine) -> None:
    customer = add_customer(engine, limit="100.00")

    def reserve(_: int) -> bool:
        with engine.begin() as conn:
            return credit.reserve_credit(conn, customer, Decimal("20.00")) is not None

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(reserve, range(20)))
    assert results.count(True) == 5
    assert credit_of(engine, customer).reserved == Decimal("100.00")
