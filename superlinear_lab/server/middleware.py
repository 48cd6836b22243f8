"""ASGI middleware around the app, outermost first:

* `BearerAuth` — with a token set, every path but ``GET /health`` needs ``Authorization: Bearer <token>``
  (constant-time compare), else 401;
* `BodyLimit` — request bodies over the limit get 413 before the app parses them;
* `CatchAll` — an unexpected exception becomes a JSON 500 and is logged; it is not re-raised, so the server
  keeps the keep-alive connection instead of resetting it.
"""
from __future__ import annotations

import hmac
import json
import logging

from .errors import error_body

log = logging.getLogger(__name__)


async def send_json(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class BearerAuth:
    """With `token` set, every request but ``GET /health`` must carry it as a bearer token."""

    def __init__(self, app, token: str | None):
        self.app = app
        self.token = None if token is None else token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.token is None or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            return await send_json(send, 401, error_body("missing or invalid bearer token (Authorization: Bearer "
                                                         "<token>)", "authentication_error", "invalid_api_key"),
                                   [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimit:
    """Bodies larger than `limit` bytes get 413; smaller ones are read and replayed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = error_body(f"request body larger than {self.limit} bytes (--max-request-bytes)",
                             "invalid_request_error", "request_too_large")
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await send_json(send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await send_json(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)


class CatchAll:
    """An exception escaping the app becomes a logged JSON 500 (if nothing was sent yet) and is not re-raised."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_json(send, 500, error_body("internal server error (logged on the server)",
                                                      "server_error"))
