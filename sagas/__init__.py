"""A small saga engine: definitions, their runner, dispatch, recovery, and its tables.

A saga is a set of steps run in parallel (a Celery chord's header), each with an action
and a compensation, and a completion (the chord's body) that confirms or compensates.
State and the step ledger live in PostgreSQL. It imports nothing of ours but ``config``:
the sagas themselves (the order saga, the refund saga) are declared with the domain they
serve (``orders.saga``, ``orders.refund_saga``) and composed by ``workers``.
"""
