"""The Celery side: the app, thin task wrappers, the retry policy, process entry points.

May import ``config``, ``orders`` and ``sagas``.
"""
