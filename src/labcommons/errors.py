"""Domain errors. Services raise these; app.py maps them to HTTP in one place."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error a service raises on purpose; `code` is the stable API error code."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details
        if code:
            self.code = code  # a more specific rule name than the class's (e.g. already_granted)

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "field": self.field, **self.details}


class NotFound(DomainError):
    status_code = 404
    code = "not_found"


class InvalidInput(DomainError):
    """Input that breaks a rule; `code` names the rule (e.g. off_slot_grid)."""

    status_code = 422
    code = "invalid_input"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None, **details: Any):
        super().__init__(message, field=field, code=code, **details)


class Conflict(DomainError):
    status_code = 409
    code = "conflict"


class Unauthenticated(DomainError):
    status_code = 401
    code = "unauthenticated"


class Forbidden(DomainError):
    status_code = 403
    code = "forbidden"


class TooManyAttempts(DomainError):
    """Refused for now because of repeated attempts; `retry_after` is in whole seconds."""

    status_code = 429
    code = "too_many_attempts"

    def __init__(self, message: str, *, retry_after: int, field: str | None = None) -> None:
        super().__init__(message, field=field, retry_after=retry_after)
        self.retry_after = retry_after
