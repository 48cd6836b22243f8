"""Typed API errors: every refusal the server makes is one of these classes, and the class fixes the HTTP status
and the OpenAI-style error ``type``. `api_error(exc)` maps library exceptions onto them by type (never by message).
"""
from __future__ import annotations

from contextlib import contextmanager

from ..engine import ContextOverflowError, SnapshotCompatibilityError, SnapshotError
from ..engine.snapshot import SnapshotNotFoundError
from .chat import ChatFormatError


class ApiError(Exception):
    """A request the server refuses; subclasses set `status` (HTTP) and `kind` (the error body's ``type``)."""

    status = 400
    kind = "invalid_request_error"
    headers: dict | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def body(self) -> dict:
        """The OpenAI-style error body."""
        return error_body(self.message, self.kind)


class BadRequest(ApiError):
    status, kind = 400, "invalid_request_error"


class ContextLengthExceeded(ApiError):
    status, kind = 400, "context_length_exceeded"


class NotFound(ApiError):
    status, kind = 404, "not_found_error"


class ModelNotFound(ApiError):
    status, kind = 404, "model_not_found"


class Conflict(ApiError):
    status, kind = 409, "conflict_error"


class InvalidSnapshot(ApiError):
    """A snapshot that fails verification (or cannot be written as asked)."""

    status, kind = 422, "snapshot_error"


class Busy(ApiError):
    """Too many requests in flight; retry shortly."""

    status, kind, headers = 429, "rate_limit_error", {"Retry-After": "1"}


class SessionLimit(ApiError):
    status, kind, headers = 429, "session_limit_error", {"Retry-After": "1"}


class MemoryBudgetExceeded(ApiError):
    """A new allocation would take the sessions' total memory over the server's budget (507 Insufficient Storage:
    free memory by deleting sessions)."""

    status, kind = 507, "memory_budget_error"


class MemoryBudgetBusy(ApiError):
    """A stateless request's transient session does not fit the memory budget right now (429: it fits once
    running requests end)."""

    status, kind, headers = 429, "memory_budget_error", {"Retry-After": "1"}


class ServerStopping(ApiError):
    status, kind = 503, "server_error"


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def api_error(e: BaseException) -> ApiError | None:
    """The `ApiError` for a library exception, or None for an unexpected one (a server bug: 500)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, SnapshotCompatibilityError):
        return Conflict(str(e))
    if isinstance(e, SnapshotNotFoundError):
        return NotFound(str(e))
    if isinstance(e, SnapshotError):
        return InvalidSnapshot(str(e))
    if isinstance(e, ContextOverflowError):
        return ContextLengthExceeded(str(e))
    if isinstance(e, (ValueError, ChatFormatError)):
        return BadRequest(str(e))
    return None


@contextmanager
def api_errors():
    """Inside this block a library exception leaves as its `ApiError` (status by type, `api_error`); an unexpected
    one propagates unchanged (a server bug: 500)."""
    try:
        yield
    except Exception as e:
        err = api_error(e)
        if err is None:
            raise
        raise err from None
