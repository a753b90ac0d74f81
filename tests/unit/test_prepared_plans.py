"""How a statement's text becomes PREPARE and EXECUTE (config.database._plan_of)."""

from __future__ import annotations

from config.database import _plan_of


def test_parameters_are_numbered_by_name_and_given_by_name() -> None:
    plan = _plan_of(
        "UPDATE t SET n = n + %(q)s WHERE id = %(id)s AND n >= %(q)s AND tag LIKE 'a%%'"
    )
    assert plan.body == "UPDATE t SET n = n + $1 WHERE id = $2 AND n >= $1 AND tag LIKE 'a%%'"
    assert plan.then == f"EXECUTE {plan.name}(%(q)s, %(id)s)"
    assert plan.first == f"PREPARE {plan.name} AS {plan.body}; {plan.then}"


def test_a_statement_without_parameters_executes_bare() -> None:
    plan = _plan_of("SELECT max(id) FROM t")
    assert plan.then == f"EXECUTE {plan.name}"


def test_one_text_one_name_two_texts_two_names() -> None:
    one, again = _plan_of("SELECT %(a)s::int"), _plan_of("SELECT %(a)s::int")
    other = _plan_of("SELECT %(a)s::bigint")
    assert one is again
    assert other.name != one.name
