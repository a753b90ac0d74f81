"""Entry point of the Celery processes: ``celery -A workers.app worker|beat|flower``."""

from __future__ import annotations

from workers.celery_app import create_celery

app = create_celery()
