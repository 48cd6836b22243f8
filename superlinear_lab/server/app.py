"""The OpenAI-compatible HTTP app (SPEC §6.5, Decision D8): chat completions, sessions and snapshots.

Safety, outermost first:

* `BearerAuth` — with a token set, every path but ``GET /health`` needs ``Authorization: Bearer <token>``
  (constant-time compare), else 401;
* `BodyLimit` — request bodies over ``max_request_bytes`` get 413 before the app parses them;
* admission — at most ``max_concurrency`` engine requests in flight (queued or running), else 429; a slot is freed
  when its job ends, not when its client leaves, so disconnects cannot pile up work;
* disconnects — a client that goes away cancels its job (polled between tokens) and the session rolls back
  (status 499 in the log: nobody is left to read it).

`max_tokens` / `max_completion_tokens` are capped at ``max_completion_tokens``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from ..engine import ContextOverflowError, SnapshotCompatibilityError, SnapshotError
from ..engine.snapshot import check_id as check_snapshot_id
from .chat import ChatFormatError, message_text
from .engine import Cancelled, ChatEngine, ChatRequest, EngineError, check_session_id

STATUS_CLIENT_CLOSED = 499


@dataclass
class ServerSettings:
    """HTTP-level limits and identity of a running server."""

    served_model: str  # the id clients must send as `model`
    api_key: str | None = None  # bearer token; None = no authentication (loopback only, enforced by `serve`)
    max_concurrency: int = 16  # engine requests in flight (queued + running); 0 = no limit
    max_completion_tokens: int = 1024  # cap on max_tokens / max_completion_tokens
    max_request_bytes: int = 8 << 20  # cap on a request body
    max_stop: int = 16  # stop strings per request
    disconnect_poll_s: float = 0.1  # how often a waiting non-streaming request checks its client


# ---------------------------------------------------------------------- ASGI middleware
def _error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class BearerAuth:
    """ASGI middleware: with `token` set, every request but ``GET /health`` must carry it as a bearer token."""

    def __init__(self, app, token: str | None):
        self.app = app
        self.token = None if token is None else token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.token is None or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            return await _send_json(send, 401, _error_body("missing or invalid bearer token (Authorization: Bearer "
                                                           "<token>)", "authentication_error", "invalid_api_key"),
                                    [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: bodies larger than `limit` bytes get 413; smaller ones are read and replayed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = _error_body(f"request body larger than {self.limit} bytes (--max-request-bytes)",
                              "invalid_request_error", "request_too_large")
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_json(send, 413, too_big)
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


class SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client leaving (whatever the ASGI spec version) and
    then cancels the body iterator, whose `finally` cancels the job."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:
            async def body():
                await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(body)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


class Admission:
    """Counts engine requests in flight; `enter()` is False when `limit` (> 0) are."""

    def __init__(self, limit: int):
        self.limit, self.active, self.rejected = limit, 0, 0

    def enter(self) -> bool:
        if self.limit and self.active >= self.limit:
            self.rejected += 1
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1


# ---------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatCompletionBody(BaseModel):
    """`POST /v1/chat/completions`. Unknown OpenAI fields are ignored; `n` must be 1; tools are not supported."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Any]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.1, ge=0, le=100)  # 0 = greedy (D7)
    top_p: float = Field(0.95, gt=0, le=1)  # honoured (D7)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None  # include_usage, flush_every_n_tokens, flush_every_ms
    seed: int | None = None
    n: int = 1
    tools: list | None = None
    session_id: str | None = None  # append `messages` as a delta to this stateful session


class SessionCreateBody(_Body):
    session_id: str | None = None  # default sess_<uuid4 hex>
    max_seq_len: int | None = None  # default: the server's --session-max-seq-len


class RollbackBody(_Body):
    keep_messages: int


class ResizeBody(_Body):
    max_seq_len: int
    strategy: str = "auto"  # auto | gpu | disk; all grow the cache in place on this engine


class SaveBody(_Body):
    title: str = ""
    description: str = ""
    tags: list[str] = []


class SnapshotPatchBody(_Body):
    title: str | None = None
    description: str | None = None
    tags: list[str] | None = None


class SnapshotLoadBody(_Body):
    session_id: str | None = None  # default sess_<uuid4 hex>
    force: bool = False  # replace an existing session of that id
    max_seq_len: int | None = None  # a larger allocation than the snapshot's


def _snapshot_json(info) -> dict:
    return {"id": info.id, "object": "snapshot", "created_at": info.created_at, "title": info.title,
            "description": info.description, "tags": list(info.tags), "current_pos": info.current_pos,
            "max_seq_len": info.max_seq_len, "model_key": info.model_key, "fingerprint": info.fingerprint}


def _snapshot_id(snapshot_id: str) -> str:
    """`snapshot_id` if well-formed, else EngineError 400 (checked before the store is touched)."""
    try:
        return check_snapshot_id(snapshot_id)
    except SnapshotError as e:
        raise EngineError(400, str(e)) from None


def _snapshot_error(e: SnapshotError) -> EngineError:
    """409 for another model's snapshot, 404 for a missing one, 422 for one that fails verification."""
    if isinstance(e, SnapshotCompatibilityError):
        return EngineError(409, str(e), "conflict_error")
    if "not found" in str(e):
        return EngineError(404, str(e), "not_found_error")
    return EngineError(422, str(e), "snapshot_error")


# ---------------------------------------------------------------------- the app
def create_app(engine: ChatEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving `engine`, wrapped in the auth and body-size middleware."""
    app = FastAPI(title="superlinear-lab", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(settings.max_concurrency)
    app.state.engine, app.state.settings, app.state.admission = engine, settings, admission

    @app.exception_handler(EngineError)
    async def on_engine_error(request, e: EngineError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(_error_body(e.message, e.kind), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors()]
        return JSONResponse(_error_body("; ".join(parts) or "invalid request", "invalid_request_error"), 400)

    def translate(e: BaseException) -> EngineError | None:
        if isinstance(e, EngineError):
            return e
        if isinstance(e, SnapshotError):
            return _snapshot_error(e)
        if isinstance(e, ContextOverflowError):
            return EngineError(400, str(e), "context_length_exceeded")
        if isinstance(e, (ValueError, ChatFormatError)):
            return EngineError(400, str(e))
        return None

    def admit() -> None:
        if not admission.enter():
            raise EngineError(429, f"server busy: {admission.limit} requests in flight (--http-max-concurrency)",
                              "rate_limit_error")

    async def engine_call(job, *args):
        """Run an engine job under admission control; errors become API errors."""
        admit()
        fut = asyncio.ensure_future(engine.run(job, *args))
        fut.add_done_callback(lambda _: admission.leave())
        try:
            return await asyncio.shield(fut)
        except Exception as e:
            err = translate(e)
            if err is None:
                raise
            raise err from None

    # ------------------------------------------------------------------ info
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.served_model}

    @app.get("/v1/server")
    async def server_stats():
        return {"model": settings.served_model, "in_flight": admission.active,
                "max_concurrency": settings.max_concurrency, "rejected": admission.rejected,
                "max_completion_tokens": settings.max_completion_tokens, "sessions": len(engine.sessions),
                "chat": dict(engine.stats)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.served_model, "object": "model", "created": 0,
                                            "owned_by": "superlinear-lab"}]}

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request):
        req = _chat_request(body)
        admit()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(kind: str, text: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, text))

        fut = asyncio.ensure_future(engine.run(engine.chat, req, emit, cancel))
        fut.add_done_callback(lambda f: (admission.leave(), events.put_nowait(("end", ""))))
        channel = _Channel(events)
        first = await channel.wait_first(request, fut, cancel, settings.disconnect_poll_s)
        if first is None:  # the client left while the request waited or prefilled
            return Response(status_code=STATUS_CLIENT_CLOSED)
        if first[0] == "end":
            channel.close()
            result = _result_or_raise(fut, translate)
            if body.stream:  # nothing was generated (e.g. max_tokens reached at once): still a valid stream
                return SSEResponse(_sse(channel, fut, cancel, body, req, settings, translate, done=result))
            return _completion_json(result, settings.served_model, req)
        if not body.stream:
            while not fut.done():
                done, _ = await asyncio.wait({fut}, timeout=settings.disconnect_poll_s)
                if not done and await request.is_disconnected():
                    cancel.set()
                    await asyncio.wait({fut})
                    channel.close()
                    return Response(status_code=STATUS_CLIENT_CLOSED)
            channel.close()
            return _completion_json(_result_or_raise(fut, translate), settings.served_model, req)
        return SSEResponse(_sse(channel, fut, cancel, body, req, settings, translate))

    def _chat_request(body: ChatCompletionBody) -> ChatRequest:
        if body.model != settings.served_model:
            raise EngineError(404, f"model {body.model!r} is not served here (this server serves "
                                   f"{settings.served_model!r})", "model_not_found")
        if body.n != 1:
            raise EngineError(400, f"n={body.n}: only n=1 is supported")
        if body.tools:
            raise EngineError(400, "tools are not supported by this server")
        try:
            messages = [message_text(m, i) for i, m in enumerate(body.messages)]
        except ChatFormatError as e:
            raise EngineError(400, str(e)) from None
        if body.session_id is None and not messages:
            raise EngineError(400, "messages: at least one message is needed without a session_id")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > settings.max_stop:
            raise EngineError(400, f"stop: at most {settings.max_stop} strings")
        opts = body.stream_options or {}
        for name in ("flush_every_n_tokens", "flush_every_ms"):
            value = opts.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise EngineError(400, f"stream_options.{name}={value!r}: expected an int >= 0")
        wanted = body.max_completion_tokens or body.max_tokens or settings.max_completion_tokens
        session = None
        if body.session_id is not None:
            session = engine.get(check_session_id(body.session_id))
        return ChatRequest(messages, min(wanted, settings.max_completion_tokens), body.temperature, body.top_p,
                           stop, body.seed, session)

    # ------------------------------------------------------------------ sessions
    @app.post("/v1/sessions", status_code=201)
    async def create_session(body: SessionCreateBody | None = None):
        body = body or SessionCreateBody()
        ss = await engine_call(engine.create_session, body.session_id, body.max_seq_len)
        return {"session_id": ss.id, **ss.info()}

    @app.get("/v1/sessions")
    async def list_sessions():
        return {"object": "list", "data": [ss.info() for ss in list(engine.sessions.values())]}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str):
        return engine.get(session_id).info()

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        engine.delete_session(session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    @app.get("/v1/sessions/{session_id}/history")
    async def history(session_id: str, tail: int | None = None):
        view = engine.get(session_id).view
        messages = view["transcript"]
        if tail is not None:
            if tail < 0:
                raise EngineError(400, f"tail={tail}: expected an int >= 0")
            messages = messages[len(messages) - tail:] if tail else []
        return {"session_id": session_id, "current_pos": view["current_pos"], "messages": messages}

    @app.post("/v1/sessions/{session_id}/rollback")
    async def rollback(session_id: str, body: RollbackBody):
        ss = await engine_call(engine.rollback, engine.get(session_id), body.keep_messages)
        return ss.info()

    @app.post("/v1/sessions/{session_id}/resize")
    async def resize(session_id: str, body: ResizeBody):
        if body.strategy not in ("auto", "gpu", "disk"):
            raise EngineError(400, f"strategy={body.strategy!r}: expected auto, gpu or disk")
        ss = await engine_call(engine.resize, engine.get(session_id), body.max_seq_len)
        return ss.info()

    @app.post("/v1/sessions/{session_id}/resize/next_pow2")
    async def resize_next_pow2(session_id: str):
        ss = engine.get(session_id)
        target = 1 << ss.view["max_seq_len"].bit_length()  # strictly above, also for a power of two
        ss = await engine_call(engine.resize, ss, target)
        return ss.info()

    @app.post("/v1/sessions/{session_id}/save", status_code=201)
    async def save(session_id: str, body: SaveBody | None = None):
        body = body or SaveBody()
        sid = await engine_call(engine.save_snapshot, engine.get(session_id), body.title, body.description,
                                body.tags)
        return _snapshot_json(await run_in_threadpool(engine.store.info, sid))

    # ------------------------------------------------------------------ snapshots
    async def store_call(fn, *args):
        try:
            return await run_in_threadpool(fn, *args)
        except SnapshotError as e:
            raise _snapshot_error(e) from None

    @app.get("/v1/snapshots")
    async def list_snapshots():
        infos = await store_call(engine.store.list, engine.model)
        return {"object": "list", "data": [_snapshot_json(i) for i in infos]}

    @app.get("/v1/snapshots/{snapshot_id}")
    async def get_snapshot(snapshot_id: str):
        return _snapshot_json(await store_call(engine.store.info, _snapshot_id(snapshot_id)))

    @app.patch("/v1/snapshots/{snapshot_id}")
    async def patch_snapshot(snapshot_id: str, body: SnapshotPatchBody):
        return _snapshot_json(await store_call(engine.store.update, _snapshot_id(snapshot_id), body.title,
                                               body.tags, body.description))

    @app.delete("/v1/snapshots/{snapshot_id}")
    async def delete_snapshot(snapshot_id: str):
        await store_call(engine.store.delete, _snapshot_id(snapshot_id))
        return {"id": snapshot_id, "object": "snapshot", "deleted": True}

    @app.post("/v1/snapshots/{snapshot_id}/load", status_code=201)
    async def load_snapshot(snapshot_id: str, body: SnapshotLoadBody | None = None):
        body = body or SnapshotLoadBody()
        ss = await engine_call(engine.load_snapshot, _snapshot_id(snapshot_id), body.session_id, body.force,
                               body.max_seq_len)
        return {"session_id": ss.id, "snapshot_id": snapshot_id, **ss.info()}

    return BearerAuth(BodyLimit(app, settings.max_request_bytes), settings.api_key)


# ---------------------------------------------------------------------- chat helpers
class _Channel:
    """Reads the job's events from an asyncio queue without losing one to a timeout."""

    def __init__(self, queue: asyncio.Queue):
        self.queue = queue
        self.getter: asyncio.Future | None = None

    async def get(self, timeout: float | None):
        """The next event, or None after `timeout` seconds."""
        if self.getter is None:
            self.getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({self.getter}, timeout=timeout)
        if not done:
            return None
        event, self.getter = self.getter.result(), None
        return event

    async def wait_first(self, request: Request, fut, cancel: threading.Event, poll: float):
        """The job's first event ("start" or "end"), or None if the client left first (the job is then
        cancelled and awaited, so its session is rolled back before this returns)."""
        while True:
            event = await self.get(poll)
            if event is not None:
                return event
            if await request.is_disconnected():
                cancel.set()
                await asyncio.wait({fut})
                self.close()
                return None

    def close(self) -> None:
        if self.getter is not None:
            self.getter.cancel()
            self.getter = None


def _result_or_raise(fut, translate):
    try:
        return fut.result()
    except Cancelled:
        raise EngineError(503, "request cancelled: the server is stopping", "server_error") from None
    except Exception as e:
        err = translate(e)
        if err is None:
            raise
        raise err from None


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _completion_json(result, model: str, req: ChatRequest) -> dict:
    out = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
           "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": result.content},
                        "finish_reason": result.finish_reason, "logprobs": None}],
           "usage": _usage(result)}
    if req.session is not None:
        out["session_id"] = req.session.id
    return out


async def _sse(channel: _Channel, fut, cancel: threading.Event, body: ChatCompletionBody, req: ChatRequest,
               settings: ServerSettings, translate, done=None):
    """SSE events of one streamed completion: a role chunk, content chunks flushed every n tokens or ms,
    a final chunk with finish_reason, an optional usage chunk, then ``data: [DONE]``. If the client leaves,
    the `finally` cancels the job (which rolls its session back)."""
    opts = body.stream_options or {}
    flush_n = max(1, opts.get("flush_every_n_tokens", 8))
    flush_s = opts.get("flush_every_ms", 50) / 1000
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish=None, **extra) -> bytes:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": settings.served_model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        if req.session is not None:
            data["session_id"] = req.session.id
        return f"data: {json.dumps(data)}\n\n".encode()

    try:
        yield chunk({"role": "assistant", "content": ""})
        pending, count, deadline = [], 0, None
        while done is None:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = await channel.get(timeout)
            if event is not None and event[0] == "delta":
                pending.append(event[1])
                count += 1
                deadline = deadline or time.monotonic() + flush_s
            if pending and (event is None or event[0] == "end" or count >= flush_n):
                text = "".join(pending)
                if text:
                    yield chunk({"content": text})
                pending, count, deadline = [], 0, None
            if event is not None and event[0] == "end":
                try:
                    done = _result_or_raise(fut, translate)
                except EngineError as e:
                    yield f"data: {json.dumps(_error_body(e.message, e.kind))}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    return
        yield chunk({}, done.finish_reason)
        if opts.get("include_usage"):
            data = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": settings.served_model, "choices": [], "usage": _usage(done)}
            yield f"data: {json.dumps(data)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        if not fut.done():
            cancel.set()
        channel.close()
