"""A small saga engine and the order saga declared with it.

A saga is a set of steps run in parallel (a Celery chord's header), each with an action
and a compensation, and a completion (the chord's body) that confirms or compensates.
State and the step ledger live in PostgreSQL. May import ``config`` and ``orders``.
"""
