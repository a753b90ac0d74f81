"""A small saga engine: definitions, their registry, runner, dispatch, recovery, and its
tables.

A saga is a sequence of stages, each a set of steps run in parallel (a Celery chord's
header), each step with an action and a compensation; a completion (the chord's body)
decides each stage: on to the next, confirm after the last, or compensate what applied,
latest stage first. Definitions carry a version; a saga runs to its end on the version
it started on (``sagas.registry``). State and the step ledger live in PostgreSQL. It
imports nothing of ours but ``config``: the sagas themselves (the order saga, the refund
saga) are declared with the domain they serve (``orders.saga``, ``orders.refund_saga``)
and composed by ``workers``. See docs/sagas.md.
"""
