"""The order domain: orders, stock, credit, their tables, services, queries and the HTTP API.

May import ``config`` only. Starts sagas through the ``SagaStarter`` port (orders.ports),
which the process's entry point supplies.
"""
