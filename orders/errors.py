"""Errors of the order domain.

OrderError
 ├── InvalidOrderError            the order cannot be accepted as sent (422)
 ├── CreditPrecheckError          the customer's available credit cannot cover it (422)
 ├── IdempotencyKeyReusedError    the key was used before for another request (422)
 ├── OrderNotFoundError           no such order (404)
 └── InvalidTransitionError       the order cannot move to that status
"""

from __future__ import annotations

from typing import Any


class OrderError(Exception):
    """Base of every error raised by the order domain."""


class InvalidOrderError(OrderError):
    """The order refers to things that do not exist or breaks a rule; nothing was written."""

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class CreditPrecheckError(InvalidOrderError):
    """The credit pre-check found the order larger than the customer's available credit
    (CREDIT_PRECHECK); nothing was written."""


class IdempotencyKeyReusedError(OrderError):
    """The Idempotency-Key was already used for a request with a different body."""


class OrderNotFoundError(OrderError):
    """No order has that id."""


class InvalidTransitionError(OrderError):
    """The order's current status does not allow the requested change."""


class OperationRefusedError(OrderError):
    """An operator's request that cannot be done now (replaying a purged letter...)."""


class OperationTargetNotFoundError(OperationRefusedError):
    """An operator's request names something that does not exist (an unknown letter)."""
