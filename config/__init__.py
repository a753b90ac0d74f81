"""Settings read from the environment once, task and queue names, Celery and logging setup.

This package imports nothing of ours: every other package may import it.
"""
