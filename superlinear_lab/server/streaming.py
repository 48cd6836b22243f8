"""Running one generation for an HTTP request: admission, disconnect handling, and the two answer shapes
(one JSON object, or server-sent events). The endpoint-specific JSON (chat vs completions) comes from a
`Format`.

* admission — at most ``max_concurrency`` engine requests in flight (queued or running), else 429; a slot is freed
  when its work ends, not when its client leaves, so disconnects cannot pile up work;
* disconnects — a client that goes away cancels its generation (the engine checks between tokens and prefill
  slices) and the session rolls back (status 499 in the log: nobody is left to read it). The disconnect is awaited,
  not polled.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import anyio
from fastapi import Request
from fastapi.responses import Response
from starlette.responses import StreamingResponse

from .engine import Cancelled, ChatEngine, Generation, GenerationRequest, GenerationResult, TokenLogprob
from .errors import ApiError, BadRequest, Busy, ServerStopping, api_errors, error_body

STATUS_CLIENT_CLOSED = 499


class Admission:
    """Counts engine requests in flight; `enter()` raises Busy when `limit` (> 0) are."""

    def __init__(self, limit: int):
        self.limit, self.active, self.rejected = limit, 0, 0

    def enter(self) -> None:
        if self.limit and self.active >= self.limit:
            self.rejected += 1
            raise Busy(f"server busy: {self.limit} requests in flight (--http-max-concurrency)")
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


async def admitted(admission: Admission, coro):
    """Await `coro` (an engine job) under admission control; library errors become API errors."""
    try:
        admission.enter()
    except Busy:
        coro.close()
        raise
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda _: admission.leave())
    try:
        with api_errors():
            return await asyncio.shield(task)
    except Cancelled:
        raise ServerStopping("request cancelled: the server is stopping") from None


def check_stream_options(opts: dict | None) -> dict:
    opts = dict(opts or {})
    for name in ("flush_every_n_tokens", "flush_every_ms"):
        value = opts.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise BadRequest(f"stream_options.{name}={value!r}: expected an int >= 0")
    if "include_usage" in opts and not isinstance(opts["include_usage"], bool):
        raise BadRequest(f"stream_options.include_usage={opts['include_usage']!r}: expected true or false")
    return opts


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class Format:
    """The JSON of one endpoint: a whole answer (`full`) and the chunks of a streamed one."""

    object_full = object_chunk = id_prefix = ""

    def __init__(self, model: str, req: GenerationRequest, rules):
        self.model, self.req, self.rules = model, req, rules  # rules: the engine's `chat.ChatRules`
        self.id, self.created = f"{self.id_prefix}{uuid.uuid4().hex}", int(time.time())

    def _wrap(self, obj: str, choices: list, **extra) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
               **extra}
        if self.req.session is not None:
            out["session_id"] = self.req.session.id
        return out

    def token_text(self, token: int) -> str:
        """A token as text (`chat.ChatRules.token_text`)."""
        return self.rules.token_text(token)

    def token_bytes(self, token: int) -> list[int]:
        return self.rules.token_bytes(token)

    def full(self, result: GenerationResult) -> dict:
        raise NotImplementedError

    def first(self) -> dict | None:
        return None

    def delta(self, text: str, entries: list[TokenLogprob]) -> dict:
        raise NotImplementedError

    def final(self, finish: str) -> dict:
        raise NotImplementedError

    def usage_chunk(self, result: GenerationResult) -> dict:
        return self._wrap(self.object_chunk, [], usage=usage(result))


class ChatFormat(Format):
    object_full, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None or not self.req.logprobs:
            return None
        return {"content": [{"token": self.token_text(e.token), "logprob": e.logprob,
                             "bytes": self.token_bytes(e.token),
                             "top_logprobs": [{"token": self.token_text(t), "logprob": lp,
                                               "bytes": self.token_bytes(t)} for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def full(self, result):
        return self._wrap(self.object_full, [{"index": 0, "message": {"role": "assistant", "content": result.content},
                                              "finish_reason": result.finish_reason,
                                              "logprobs": self._logprobs(result.logprobs)}], usage=usage(result))

    def first(self):
        return self._wrap(self.object_chunk, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None, "logprobs": None}])

    def delta(self, text, entries):
        return self._wrap(self.object_chunk, [{"index": 0, "delta": {"content": text}, "finish_reason": None,
                                               "logprobs": self._logprobs(entries)}])

    def final(self, finish):
        return self._wrap(self.object_chunk, [{"index": 0, "delta": {}, "finish_reason": finish,
                                               "logprobs": None}])


class CompletionFormat(Format):
    object_full = object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset (the
        character where the token's text starts in the reply; the prompt is not echoed)."""
        if entries is None or not self.req.logprobs:
            return None
        return {"tokens": [self.token_text(e.token) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": [e.offset for e in entries]}

    def full(self, result):
        return self._wrap(self.object_full, [{"index": 0, "text": result.content, "logprobs":
                                              self._logprobs(result.logprobs),
                                              "finish_reason": result.finish_reason}], usage=usage(result))

    def delta(self, text, entries):
        return self._wrap(self.object_chunk, [{"index": 0, "text": text, "logprobs": self._logprobs(entries),
                                               "finish_reason": None}])

    def final(self, finish):
        return self._wrap(self.object_chunk, [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish}])


# ---------------------------------------------------------------------- running a generation
class SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client leaving (whatever the ASGI spec version) and
    then cancels the body iterator, whose `finally` cancels the generation."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:
            async def body():
                await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(body)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


def _result(gen: Generation) -> GenerationResult:
    try:
        with api_errors():
            return gen.future.result()
    except Cancelled:
        raise ServerStopping("request cancelled: the server is stopping") from None


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body was already read, so the next ASGI message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def generate(request: Request, engine: ChatEngine, admission: Admission, req: GenerationRequest,
                   fmt: Format, stream: bool, stream_options: dict):
    """Answer one generation request: JSON, or SSE when `stream`; 499 (empty) if the client leaves first."""
    admission.enter()
    events: asyncio.Queue = asyncio.Queue()
    gen = engine.start(req, (lambda batch: [events.put_nowait(e) for e in batch]) if stream else None)
    gen.future.add_done_callback(lambda _: (admission.leave(), events.put_nowait(("end", None))))
    gone = asyncio.ensure_future(_client_gone(request))
    first = asyncio.ensure_future(events.get()) if stream else gen.future
    try:
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()  # SSEResponse listens for the disconnect itself from here on
    if not first.done():  # the client left while the request waited or prefilled
        gen.cancel()
        await asyncio.wait({gen.future})
        if stream:
            first.cancel()
        return Response(status_code=STATUS_CLIENT_CLOSED)
    if not stream:
        return fmt.full(_result(gen))
    event = first.result()
    if event[0] == "end":
        _result(gen)  # raises the request's error as a normal HTTP error
    return SSEResponse(_sse(events, gen, fmt, stream_options, event))


async def _sse(events: asyncio.Queue, gen: Generation, fmt: Format, opts: dict, first):
    """SSE events of one streamed generation: an opening chunk (chat), content chunks flushed every n tokens or
    ms, a final chunk with finish_reason, an optional usage chunk, then ``data: [DONE]``. If the client leaves, the
    `finally` cancels the generation (which rolls its session back)."""
    flush_n = max(1, opts.get("flush_every_n_tokens", 8))
    flush_s = opts.get("flush_every_ms", 50) / 1000

    def sse(data: dict) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    try:
        opening = fmt.first()
        if opening is not None:
            yield sse(opening)
        text, entries, count, deadline = [], [], 0, None
        event = first
        while True:
            if event is not None and event[0] == "delta":
                text.append(event[1][0])
                entries += event[1][1]
                count += 1
                deadline = deadline or time.monotonic() + flush_s
            end = event is not None and event[0] == "end"
            if (text or entries) and (event is None or end or count >= flush_n):
                yield sse(fmt.delta("".join(text), entries))
                text, entries, count, deadline = [], [], 0, None
            if end:
                break
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = await asyncio.wait_for(events.get(), timeout)
            except asyncio.TimeoutError:
                event = None
        try:
            done = _result(gen)
        except ApiError as e:
            yield sse(e.body())
            yield b"data: [DONE]\n\n"
            return
        yield sse(fmt.final(done.finish_reason))
        if opts.get("include_usage"):
            yield sse(fmt.usage_chunk(done))
        yield b"data: [DONE]\n\n"
    finally:
        if not gen.future.done():
            gen.cancel()


__all__ = ["Admission", "ChatFormat", "CompletionFormat", "SSEResponse", "admitted", "check_stream_options",
           "error_body", "generate", "usage"]
