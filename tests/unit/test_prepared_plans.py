"""How a statement's text becomes PREPARE and EXECUTE (config.database)."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text

from config.database import _plan_of, prepared


def test_parameters_are_numbered_by_name_and_given_by_name() -> None:
    plan = _plan_of(
        "UPDATE t SET n = n + %(q)s WHERE id = %(id)s AND n >= %(q)s AND tag LIKE 'a%%'",
        "add_to_t",
    )
    assert plan.body == "UPDATE t SET n = n + $1 WHERE id = $2 AND n >= $1 AND tag LIKE 'a%%'"
    assert plan.then == "EXECUTE add_to_t(%(q)s, %(id)s)"
    assert plan.first == f"PREPARE add_to_t AS {plan.body}; {plan.then}"


def test_a_statement_without_parameters_executes_bare() -> None:
    assert _plan_of("SELECT max(id) FROM t", "newest_t").then == "EXECUTE newest_t"


def test_one_text_one_name_and_a_second_text_of_a_name_numbered() -> None:
    one, again = _plan_of("SELECT %(a)s::int", "cast_a"), _plan_of("SELECT %(a)s::int", "cast_a")
    other = _plan_of("SELECT %(a)s::bigint", "cast_a")
    assert one is again
    assert (one.name, other.name) == ("cast_a", "cast_a_2")


@pytest.mark.parametrize("name", ["", "Upper", "two words", "x; DROP TABLE t", "1st"])
def test_a_name_is_a_plain_identifier(name: str) -> None:
    with pytest.raises(ValueError, match="lowercase identifier"):
        prepared(name, select(text("1")))
