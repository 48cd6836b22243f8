"""`ChatEngine`: the server's sessions, snapshots and chat turns, run one at a time (SPEC §6.3 single flight).

Every operation that touches a model or a session cache runs as a *job* on the engine's one worker thread, so
jobs never interleave. A chat turn on a session is atomic: it checkpoints first, and any failure or cancellation
(a client that disconnected) rolls the session back, so the transcript and the cache are exactly as before the
request. The HTTP layer (`app.py`) only validates, queues jobs and streams their events.

Readers (session list, info, history) do not wait for the worker: each `ServerSession` publishes a copy of its
state (`view`) whenever a job on it commits, and readers see that last committed state.
"""
from __future__ import annotations

import asyncio
import codecs
import copy
import re
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ..engine import Session, SnapshotStore
from .chat import generation_prompt, render, render_message, stop_token_ids, transcript_problem

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Cancelled(Exception):
    """The request was cancelled (client disconnected or server stopping); its session was rolled back."""


@dataclass
class ChatRequest:
    """One validated chat turn.

    messages: (role, content) pairs — the whole conversation, or the delta for a session.
    session: the `ServerSession` to append to, or None for a stateless request (prefill everything).
    """

    messages: list[tuple[str, str]]
    max_tokens: int  # already capped by the server limit
    temperature: float  # 0 = greedy (Decision D7)
    top_p: float  # 1 disables top-p
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the reply)
    seed: int | None = None  # reseeds the session's sampler for this turn
    session: "ServerSession | None" = None


@dataclass
class ChatResult:
    """What a finished chat turn produced."""

    content: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens or a full context)
    prompt_tokens: int  # tokens prefilled by this request (the delta for a session)
    completion_tokens: int


class ServerSession:
    """A named `Session` plus the state readers see (`view`, updated when a job on it commits)."""

    def __init__(self, session_id: str, session: Session, origin: str = "created"):
        self.id = session_id
        self.session = session
        self.created_at = time.time()
        self.origin = origin  # "created" or "snapshot:<id>"
        self.verified = False  # transcript checked against the cache since the last load
        self.view: dict = {}
        self.publish()

    def publish(self) -> None:
        """Copy the committed state for readers (called by the worker after every job on this session)."""
        s = self.session
        self.view = {
            "id": self.id, "object": "session", "created_at": int(self.created_at), "origin": self.origin,
            "max_seq_len": s.max_len, "current_pos": s.cursor, "messages": len(s.transcript),
            "memory_bytes": s.memory()["total"],
            "transcript": [{"role": m.get("role"), "content": m.get("content"), "tokens": m.get("tokens")}
                           for m in s.transcript],
        }

    def info(self) -> dict:
        """The published state without the transcript."""
        return {k: v for k, v in self.view.items() if k != "transcript"}


def new_session_id() -> str:
    """``sess_<uuid4 hex>``."""
    return f"sess_{uuid.uuid4().hex}"


def check_session_id(session_id) -> str:
    """Return `session_id` if it matches ``^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$``, else raise EngineError (400)."""
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise EngineError(400, f"session_id={session_id!r}: expected 1-128 characters of [A-Za-z0-9_-], starting "
                               "with a letter or digit")
    return session_id


class ChatEngine:
    """Sessions, snapshots and chat turns over one model, serialised on one worker thread.

    Args:
        model: the served `HybridLM` (eval mode).
        store: where snapshots live.
        session_max_seq_len: allocation of a new session when the request names none.
        max_seq_len_limit: the largest allocation a request may ask for.
        max_sessions: sessions held at once.
        max_prompt_tokens: the longest prompt one request may prefill.
        chunk_size: prefill chunk length (cancellation is checked between chunks).
    """

    def __init__(self, model, store: SnapshotStore, *, session_max_seq_len: int = 131072,
                 max_seq_len_limit: int = 1048576, max_sessions: int = 64, max_prompt_tokens: int = 1048576,
                 chunk_size: int = 8192):
        self.model = model
        self.tokenizer = model.tokenizer
        self.store = store
        self.session_max_seq_len = session_max_seq_len
        self.max_seq_len_limit = max_seq_len_limit
        self.max_sessions = max_sessions
        self.max_prompt_tokens = max_prompt_tokens
        self.chunk_size = chunk_size
        self.sessions: dict[str, ServerSession] = {}
        self.closing = threading.Event()
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0}  # chat turns by outcome (worker-written)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="superlinear-engine")
        self._stops = stop_token_ids(self.tokenizer)

    # ------------------------------------------------------------------ running jobs
    async def run(self, job: Callable, *args):
        """Run `job(*args)` on the worker thread (after every job queued before it) and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, job, *args)

    def close(self) -> None:
        """Cancel running jobs (they roll back) and stop the worker."""
        self.closing.set()
        self._worker.shutdown(wait=True, cancel_futures=True)

    def get(self, session_id: str) -> ServerSession:
        """The session named `session_id`, or EngineError 404."""
        ss = self.sessions.get(session_id)
        if ss is None:
            raise EngineError(404, f"session {session_id!r} not found", "not_found_error")
        return ss

    def _check_len(self, max_seq_len) -> int:
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise EngineError(400, f"max_seq_len={max_seq_len!r}: expected an int >= 2")
        if max_seq_len > self.max_seq_len_limit:
            raise EngineError(400, f"max_seq_len={max_seq_len}: larger than this server's limit "
                                   f"{self.max_seq_len_limit} (--max-seq-len-limit)")
        return max_seq_len

    def _claim_id(self, session_id: str | None, force: bool = False) -> str:
        sid = new_session_id() if session_id is None else check_session_id(session_id)
        if sid in self.sessions and not force:
            raise EngineError(409, f"session {sid!r} already exists (pass force to replace it)", "conflict_error")
        if sid not in self.sessions and len(self.sessions) >= self.max_sessions:
            raise EngineError(429, f"session limit reached ({self.max_sessions} sessions, --max-sessions); delete "
                                   "one first", "session_limit_error")
        return sid

    # ------------------------------------------------------------------ session jobs (worker thread)
    def create_session(self, session_id: str | None, max_seq_len: int | None) -> ServerSession:
        """Job: allocate a new empty session."""
        sid = self._claim_id(session_id)
        n = self._check_len(self.session_max_seq_len if max_seq_len is None else max_seq_len)
        ss = ServerSession(sid, Session(self.model, n, chunk_size=self.chunk_size, progress=False))
        ss.verified = True
        self.sessions[sid] = ss
        return ss

    def delete_session(self, session_id: str) -> None:
        """Forget a session (a job already running on it finishes on the orphaned object)."""
        self.get(session_id)
        del self.sessions[session_id]

    def rollback(self, ss: ServerSession, keep_messages: int) -> ServerSession:
        """Job: keep the first `keep_messages` messages; the cache is recreated and re-prefilled (SPEC §6.2)."""
        s = ss.session
        if keep_messages != 0:  # keeping nothing also resets a session whose transcript does not match
            self._require_consistent(ss)
        if isinstance(keep_messages, bool) or not isinstance(keep_messages, int) \
                or not 0 <= keep_messages <= len(s.transcript):
            raise EngineError(400, f"keep_messages={keep_messages!r}: expected an int in [0, {len(s.transcript)}]")
        kept = s.transcript[:keep_messages]
        n = sum(m["tokens"] for m in kept)
        fresh = Session(self.model, s.max_len, chunk_size=self.chunk_size, progress=False)
        if n:
            fresh.append(s.ids[:n], role=None)
        fresh.transcript = copy.deepcopy(kept)
        ss.session = fresh
        ss.verified = True
        ss.publish()
        return ss

    def resize(self, ss: ServerSession, max_seq_len: int) -> ServerSession:
        """Job: grow the allocation (contents, cursor and transcript kept)."""
        n = self._check_len(max_seq_len)
        if n < ss.session.max_len:
            raise EngineError(400, f"max_seq_len={n}: smaller than the session's {ss.session.max_len} (a session "
                                   "only grows)")
        ss.session.grow(n)
        ss.publish()
        return ss

    def save_snapshot(self, ss: ServerSession, title: str, description: str, tags: list[str]) -> str:
        """Job: write the session to the snapshot store; returns the snapshot id."""
        return self.store.save(ss.session, title=title, tags=tags, description=description)

    def load_snapshot(self, snapshot_id: str, session_id: str | None, force: bool,
                      max_seq_len: int | None) -> ServerSession:
        """Job: verify a snapshot and hold it as a session (replacing an existing one only with `force`)."""
        sid = self._claim_id(session_id, force)
        if max_seq_len is not None:
            self._check_len(max_seq_len)
        s = self.store.load(snapshot_id, self.model, max_len=max_seq_len, chunk_size=self.chunk_size,
                            progress=False)
        ss = ServerSession(sid, s, origin=f"snapshot:{snapshot_id}")
        self.sessions[sid] = ss
        return ss

    def _require_consistent(self, ss: ServerSession) -> None:
        if ss.verified:
            return
        problem = transcript_problem(self.tokenizer, ss.session.transcript, ss.session.ids.tolist())
        if problem:
            raise EngineError(409, f"session {ss.id!r}: transcript does not match the cache: {problem}",
                              "conflict_error")
        ss.verified = True

    # ------------------------------------------------------------------ chat (worker thread)
    def chat(self, req: ChatRequest, emit: Callable[[str, str], None], cancel: threading.Event) -> ChatResult:
        """Job: `_chat`, counted in `stats` by outcome."""
        try:
            result = self._chat(req, emit, cancel)
        except Cancelled:
            self.stats["cancelled"] += 1
            raise
        except BaseException:
            self.stats["failed"] += 1
            raise
        self.stats["completed"] += 1
        return result

    def _chat(self, req: ChatRequest, emit: Callable[[str, str], None], cancel: threading.Event) -> ChatResult:
        """One chat turn. `emit("start", "")` is called once the prompt is in the cache, then
        `emit("delta", text)` with the reply text as it becomes final; `cancel` is polled between prefill chunks
        and tokens.

        On a session, the turn is atomic: on any exception (Cancelled included) the session is rolled back.
        """
        def check_cancel():
            if cancel.is_set() or self.closing.is_set():
                raise Cancelled("request cancelled")

        check_cancel()
        tok = self.tokenizer
        ss = req.session
        if ss is None:
            ids = render(tok, req.messages, first=True) + generation_prompt(tok)
            self._check_prompt(len(ids))
            seed = secrets.randbits(62) if req.seed is None else req.seed  # stateless calls differ unless seeded
            session = Session(self.model, len(ids) + req.max_tokens + 2, chunk_size=self.chunk_size,
                              seed=seed, progress=False)
            new_messages = []
        else:
            if self.sessions.get(ss.id) is not ss:
                raise EngineError(404, f"session {ss.id!r} was deleted", "not_found_error")
            self._require_consistent(ss)
            session = ss.session
            new_messages = self._session_delta(session, req.messages)
            first = session.cursor == 0
            ids = render(tok, new_messages, first=first) + generation_prompt(tok)
            self._check_prompt(len(ids))
            if session.cursor + len(ids) + 1 > session.max_len - 1:
                raise EngineError(400, f"context full: {len(ids)} prompt tokens at position {session.cursor} need "
                                       f"more than the session's max_seq_len {session.max_len}; resize the session",
                                  "context_length_exceeded")
        before = session.checkpoint()
        try:
            for c0 in range(0, len(ids), self.chunk_size):
                check_cancel()
                session.append(ids[c0:c0 + self.chunk_size], role=None)
            for i, (role, content) in enumerate(new_messages):
                n = len(render_message(tok, role, content)) + (1 if i == 0 and before.cursor == 0 else 0)
                session.transcript.append({"role": role, "content": content, "tokens": n})
            emit("start", "")
            result = self._generate(session, req, emit, check_cancel)
            result.prompt_tokens = len(ids)
            if ss is not None:
                session.append([tok.special["<|end|>"]], role=None)
                session.transcript.append({"role": "assistant", "content": result.content,
                                           "tokens": result.completion_tokens + 2})
                ss.publish()
            return result
        except BaseException:
            if ss is not None:
                session.rollback(before)
            raise

    def _check_prompt(self, n: int) -> None:
        if n > self.max_prompt_tokens:
            raise EngineError(400, f"prompt of {n} tokens is longer than this server's limit {self.max_prompt_tokens}"
                                   " (--max-prompt-tokens)", "context_length_exceeded")

    def _session_delta(self, session: Session, messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The messages to append: a leading system message equal to the stored one is dropped; a different one
        is refused unless the session is empty (SPEC §6.5)."""
        transcript = session.transcript
        if messages and messages[0][0] == "system" and transcript:
            stored = transcript[0]
            if stored.get("role") == "system" and stored.get("content") == messages[0][1]:
                return messages[1:]
            raise EngineError(409, "a leading system message can only be set while the session is empty (it differs "
                                   "from the stored one, or the session has none)", "conflict_error")
        return list(messages)

    def _generate(self, session: Session, req: ChatRequest, emit, check_cancel) -> ChatResult:
        """Decode up to max_tokens after the generation prompt, honouring stop strings: the reply is trimmed to
        before the first stop string, and so is the cache (rollback to the reply start, re-append the rest)."""
        stops = [s.encode("utf-8") for s in req.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1  # bytes that may still start a stop string
        budget = min(req.max_tokens, session.max_len - 2 - session.cursor)
        reply_start = session.checkpoint() if stops else None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = bytearray()
        emitted = 0
        finish = "length"
        tokens = session.stream(budget, req.temperature, req.top_p, stop=self._stops, seed=req.seed, role=None)
        try:
            for token in tokens:
                out.append(token)  # every non-special token is one byte
                check_cancel()
                hit = next((s for s in stops if out.endswith(s)), None)
                if hit is not None:
                    del out[len(out) - len(hit):]
                    finish = "stop"
                    break
                safe = len(out) - hold
                if safe > emitted:
                    emit("delta", decoder.decode(bytes(out[emitted:safe])))
                    emitted = safe
            else:
                if len(out) < budget:
                    finish = "stop"
        finally:
            tokens.close()
        if finish == "stop" and reply_start is not None and session.cursor != reply_start.cursor + len(out):
            session.rollback(reply_start)
            if out:
                session.append(list(out), role=None)
        if len(out) > emitted:
            emit("delta", decoder.decode(bytes(out[emitted:])))
        tail = decoder.decode(b"", final=True)
        if tail:
            emit("delta", tail)
        content = bytes(out).decode("utf-8", errors="replace")
        return ChatResult(content, finish, 0, len(out))

