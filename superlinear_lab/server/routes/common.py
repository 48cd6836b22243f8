"""What every router needs: the app's engine, settings and admission, and the request checks shared by the two
generation endpoints."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from ..engine import ChatEngine
from ..errors import BadRequest, ModelNotFound


@dataclass
class ServerSettings:
    """HTTP-level limits and identity of a running server."""

    served_model: str  # the id clients must send as `model`
    api_key: str | None = None  # bearer token; None = no authentication (loopback only, enforced by `serve`)
    max_concurrency: int = 16  # engine requests in flight (queued + running); 0 = no limit
    max_completion_tokens: int = 1024  # cap on max_tokens / max_completion_tokens
    max_request_bytes: int = 8 << 20  # cap on a request body
    max_stop: int = 16  # stop strings per request


@dataclass
class AppState:
    engine: ChatEngine
    settings: ServerSettings
    admission: object  # streaming.Admission


def state(request: Request) -> AppState:
    return request.app.state.server


def check_model(settings: ServerSettings, model: str) -> None:
    if model != settings.served_model:
        raise ModelNotFound(f"model {model!r} is not served here (this server serves {settings.served_model!r})")


def check_common(settings: ServerSettings, body) -> list[str]:
    """Checks shared by chat and completions; returns the stop strings as a list."""
    check_model(settings, body.model)
    if body.n != 1:
        raise BadRequest(f"n={body.n}: only n=1 is supported")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > settings.max_stop:
        raise BadRequest(f"stop: at most {settings.max_stop} strings")
    return stop
