"""The OpenAI-compatible HTTP app (docs/algorithm.md §6.5, Decision D8 in docs/design.md): completions, chat completions, sessions, snapshots.

`create_app` assembles one router per resource (`routes`), the typed-error handlers (`errors`: the exception
class fixes the status) and the middleware (`middleware`: bearer auth, body limit, catch-all 500). Admission
control, disconnects and streaming live in `streaming`; the scheduling of the work in `engine`.

`max_tokens` / `max_completion_tokens` are capped at ``max_completion_tokens``.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import __version__
from .engine import ChatEngine
from .errors import ApiError, error_body
from .middleware import BearerAuth, BodyLimit, CatchAll
from .routes import chat, completions, info, sessions, snapshots
from .routes.common import AppState, ServerSettings
from .streaming import Admission

log = logging.getLogger(__name__)

__all__ = ["ServerSettings", "create_app"]


def create_app(engine: ChatEngine, settings: ServerSettings):
    """The ASGI app serving `engine`: the FastAPI app wrapped in auth, body-size and catch-all middleware."""
    app = FastAPI(title="superlinear-lab", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = AppState(engine, settings, Admission(settings.max_concurrency))
    for module in (info, chat, completions, sessions, snapshots):
        app.include_router(module.router)

    @app.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"][1:]) or "body"
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 80 else shown[:80] + "…"
            parts.append(f"{where}: {err['msg']} (got {shown})" if "input" in err and err["loc"][1:] else
                         f"{where}: {err['msg']}")
        return JSONResponse(error_body("; ".join(parts) or "invalid request", "invalid_request_error"), 400)

    @app.exception_handler(Exception)
    async def on_unexpected(request, e: Exception):
        return JSONResponse(error_body("internal server error (logged on the server)", "server_error"), 500)

    return BearerAuth(BodyLimit(CatchAll(app), settings.max_request_bytes), settings.api_key)
