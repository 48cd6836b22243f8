"""`ChatEngine`: the server's sessions, snapshots and generations, scheduled on one worker thread.

Every operation that touches the model or a session cache runs on the engine's worker thread, so nothing
interleaves inside an operation. The worker loops over three kinds of work:

* **jobs** (create, rollback, resize, save, load, …) run to completion, in arrival order;
* **prefill** of a generation's prompt: prompts of at most `prefill_slice` tokens are prefilled as soon as they
  arrive (equal-length chunks of many prompts in one forward); longer ones are *background* work, prefilled in
  slices of about `slice_target_s` seconds: while anything else waits, a long
  prefill gets at most `background_share` of the worker's time, so a short request is never starved behind a
  128K-token prompt (and a long prompt still advances while short requests keep coming);
* **decode**: one step for every generation that is decoding, as one batched forward (`engine.batch`) for the
  rows whose context is at most `batch_max_context` tokens, alone for the others.

A generation on a session is atomic: it checkpoints first, and any failure or cancellation (a client that
disconnected, a server that stops) rolls the session back, so its transcript and cache are exactly as before the
request. Work on one session keeps its arrival order: a job or generation waits while an earlier one on the same
session runs. Memory is budgeted: the bytes of all sessions (and of the transient sessions of stateless
requests) stay under `memory_budget`.

Readers (session list, info, history) do not wait for the worker: each `ServerSession` publishes a copy of its
state (`view`) whenever work on it commits, and readers see that last committed state.

With `persist`, sessions survive restarts: they are autosaved to the snapshot store (tags ``autosave`` and
``session:<id>``) when idle for `autosave_idle_s` and on shutdown, and `restore_autosaved()` loads them on start.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import Session, SnapshotStore
from ..engine.batch import can_batch, decode_step, forward_rows
from ..ids import validate_id
from .chat import chat_rules
from .errors import (BadRequest, Conflict, ContextLengthExceeded, MemoryBudgetBusy, MemoryBudgetExceeded, NotFound,
                     SessionLimit)

log = logging.getLogger(__name__)

AUTOSAVE_TAG = "autosave"
SESSION_TAG_PREFIX = "session:"


class Cancelled(Exception):
    """The request was cancelled (client disconnected or server stopping); its session was rolled back."""


@dataclass
class GenerationRequest:
    """One validated generation: a chat turn (`messages`) or a plain completion (`prompt_ids`).

    messages: (role, content) pairs — the whole conversation, or the delta for a session; None for a completion.
    prompt_ids: token ids of a completion prompt; None for a chat turn.
    session: the `ServerSession` to append to, or None for a stateless request (prefill everything).
    top_logprobs: with `logprobs`, how many alternatives to report per token (0-20).
    """

    messages: list[tuple[str, str]] | None
    max_tokens: int  # already capped by the server limit
    temperature: float  # 0 = greedy (Decision D7 in docs/design.md)
    top_p: float  # 1 disables top-p
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the reply)
    seed: int | None = None  # reseeds the session's sampler for this turn
    session: "ServerSession | None" = None
    prompt_ids: list[int] | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    """Log-probability of one generated token under the model (log-softmax of the raw logits, before
    temperature and top-p), with the `top` most likely alternatives as (token id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int = 0  # characters of the reply's text before this token's text


@dataclass
class GenerationResult:
    """What a finished generation produced."""

    content: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens or a full context)
    prompt_tokens: int  # tokens prefilled by this request (the delta for a session)
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per generated token of `content` when asked for


class ServerSession:
    """A named `Session` plus the state readers see (`view`, updated when work on it commits)."""

    def __init__(self, session_id: str, session: Session, origin: str = "created"):
        self.id = session_id
        self.session = session
        self.created_at = time.time()
        self.origin = origin  # "created", "snapshot:<id>" or "autosave:<id>"
        self.verified = False  # transcript checked against the cache since the last load
        self.busy = False  # a generation on it is in progress (worker-owned)
        self.dirty = True  # changed since the last autosave
        self.autosave_id: str | None = None  # the snapshot holding its last autosave
        self.changed_at = time.monotonic()
        self.view: dict = {}
        self.publish()

    def publish(self) -> None:
        """Copy the committed state for readers (called by the worker after every change to this session)."""
        s = self.session
        self.view = {
            "id": self.id, "object": "session", "created_at": int(self.created_at), "origin": self.origin,
            "max_seq_len": s.max_len, "current_pos": s.cursor, "messages": len(s.transcript),
            "memory_bytes": s.memory()["total"],
            "transcript": [{"role": m.get("role"), "content": m.get("content"), "tokens": m.get("tokens")}
                           for m in s.transcript],
        }
        self.dirty = True
        self.changed_at = time.monotonic()

    def info(self) -> dict:
        """The published state without the transcript."""
        return {k: v for k, v in self.view.items() if k != "transcript"}


def new_session_id() -> str:
    """``sess_<uuid4 hex>``."""
    return f"sess_{uuid.uuid4().hex}"


def check_session_id(session_id) -> str:
    """`session_id` if it follows the id rule (`superlinear_lab.ids`), else BadRequest."""
    try:
        return validate_id(session_id, "session_id")
    except ValueError as e:
        raise BadRequest(str(e)) from None


# ---------------------------------------------------------------------- work items
class _Job:
    def __init__(self, fn: Callable, args: tuple, keys: frozenset, loop, future):
        self.fn, self.args, self.keys, self.loop, self.future = fn, args, keys, loop, future


class Generation:
    """A generation in the engine: its request, its progress and how it reports back.

    `future` (an asyncio future on the request's loop) gets the `GenerationResult` or the exception; `on_events`
    (called on that loop) receives lists of events: ``("start", None)`` once the prompt is in the cache, then
    ``("delta", (text, [TokenLogprob]))`` as the reply becomes final. `cancel()` may be called from any thread.
    """

    def __init__(self, req: GenerationRequest, loop, future, on_events: Callable[[list], None] | None):
        self.req, self.loop, self.future, self.on_events = req, loop, future, on_events
        self.keys = frozenset() if req.session is None else frozenset({req.session.id})
        self.cancelled = threading.Event()
        # worker-owned progress
        self.phase = "queued"  # queued -> prefill -> decode
        self.session: Session | None = None
        self.ids: list[int] = []
        self.pos = 0  # prompt tokens prefilled
        self.before = None  # checkpoint of a server session
        self.new_messages: list[tuple[str, str]] = []
        self.turn = None  # the chat turn (`chat.Turn`) of a chat request
        self.out: list[int] = []  # reply tokens
        self.text = ""  # their text
        self.anchor, self.anchor_text = 0, ""  # a settled token count and its text (incremental decoding)
        self.ends: list[int] = []  # ends[k]: characters of settled text after token k
        self.cut: int | None = None  # where a stop string starts in `text`
        self.entries: list[TokenLogprob] = []
        self.emitted = 0  # characters sent
        self.sent = ""  # the text sent
        self.emitted_entries = 0
        self.stops: list[str] = [s for s in req.stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # characters that may still start a stop
        self.budget = 0
        self.reply_start = None
        self.reserved = 0  # bytes of a transient session counted in the memory budget
        self.reseed: int | None = None  # seed for the next draw

    def cancel(self) -> None:
        self.cancelled.set()


class ChatEngine:
    """Sessions, snapshots and generations over one model, scheduled on one worker thread (module docstring).

    Args:
        model: the served model (eval mode): a `HybridLM`, or an `hf.HFModel`.
        store: where snapshots live.
        session_max_seq_len: allocation of a new session when the request names none.
        max_seq_len_limit: the largest allocation a request (or a loaded snapshot) may have.
        max_sessions: sessions held at once.
        max_prompt_tokens: the longest prompt one request may prefill.
        chunk_size: chunk length of the sessions' own prefill (rollback re-prefill).
        prefill_slice: most tokens of a long prompt prefilled per scheduling step (cancellation is checked between
            slices); a slice is shortened to take about `slice_target_s` seconds at the measured cost per token
            (at least 16 tokens), so a request that arrives mid-slice waits at most about that long.
        memory_budget: total bytes of all sessions (None = no budget).
        background_share: the share of the worker a long prefill gets while other work waits.
        batch_max_context: sessions up to this cursor decode in the batched forward.
        persist: autosave sessions (idle and on shutdown); `restore_autosaved()` brings them back.
        autosave_idle_s: a changed session idle this long is autosaved (with `persist`).
        slice_target_s: the duration a long-prefill slice aims for.
        chat_template: a Jinja chat template for a transformers tokenizer (replaces its own; `chat.chat_rules`).
    """

    def __init__(self, model, store: SnapshotStore, *, session_max_seq_len: int = 131072,
                 max_seq_len_limit: int = 1048576, max_sessions: int = 64, max_prompt_tokens: int = 1048576,
                 chunk_size: int = 8192, prefill_slice: int = 256, memory_budget: int | None = None,
                 background_share: float = 0.2, batch_max_context: int = 4096, persist: bool = False,
                 autosave_idle_s: float = 60.0, slice_target_s: float = 0.1, chat_template: str | None = None):
        self.model = model
        self.tokenizer = model.tokenizer
        self.chat = chat_rules(self.tokenizer, chat_template)  # every chat-format and reply-text decision
        self.store = store
        self.session_max_seq_len = session_max_seq_len
        self.max_seq_len_limit = max_seq_len_limit
        self.max_sessions = max_sessions
        self.max_prompt_tokens = max_prompt_tokens
        self.chunk_size = chunk_size
        self.prefill_slice = prefill_slice
        self.memory_budget = memory_budget
        self.background_share = background_share
        self.batch_max_context = batch_max_context
        self.persist = persist
        self.autosave_idle_s = autosave_idle_s
        self.sessions: dict[str, ServerSession] = {}
        self.closing = threading.Event()
        # chat turns by outcome; decode steps and the rows they carried (worker-written)
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "decode_steps": 0, "decoded_tokens": 0,
                      "batched_steps": 0}
        self._stops = set(self.chat.stop_ids)
        # bytes of a session of n positions = per_position * n + fixed (measured, not re-derived)
        one, two = (Session(model, n, progress=False).memory()["total"] for n in (1, 2))
        self._per_position, self._fixed = two - one, 2 * one - two
        self._cond = threading.Condition()
        self._inbox: deque = deque()
        self._queue: list = []  # items not started yet, in arrival order
        self._active: list[Generation] = []  # started generations (prefill or decode)
        self._busy_time = [0.0, 0.0]  # [background prefill, everything else] while contended
        self._outbox: list = []  # (generation, event) to deliver at the end of the round
        self.slice_target_s = slice_target_s
        self._slice_s_per_token = 1e-3  # measured cost of long-prefill slices (updated after each)
        self._thread = threading.Thread(target=self._loop, name="superlinear-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting work (event loop side)
    async def run(self, fn: Callable, *args, keys=()):
        """Run the job ``fn(*args)`` on the worker (after earlier work on the sessions named in `keys`) and return
        its result (or raise its exception)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(_Job(fn, args, frozenset(keys), loop, future))
        return await future

    def start(self, req: GenerationRequest, on_events: Callable[[list], None] | None = None) -> Generation:
        """Queue a generation; its `future` resolves on the calling event loop."""
        loop = asyncio.get_running_loop()
        gen = Generation(req, loop, loop.create_future(), on_events)
        self._submit(gen)
        return gen

    def _submit(self, item) -> None:
        with self._cond:
            if self.closing.is_set():
                raise Cancelled("the server is stopping")
            self._inbox.append(item)
            self._cond.notify()

    def close(self) -> None:
        """Cancel queued and running work (sessions roll back), autosave with `persist`, stop the worker."""
        with self._cond:
            self.closing.set()
            self._cond.notify()
        self._thread.join(timeout=120)

    # ------------------------------------------------------------------ reading (any thread)
    def get(self, session_id: str) -> ServerSession:
        """The session named `session_id`, or NotFound."""
        ss = self.sessions.get(session_id)
        if ss is None:
            raise NotFound(f"session {session_id!r} not found")
        return ss

    def memory_in_use(self) -> int:
        """Bytes held by the sessions and by the transient sessions of running stateless requests."""
        return sum(ss.session.memory()["total"] for ss in list(self.sessions.values())) + \
            sum(g.reserved for g in list(self._active))

    def progress(self) -> list[dict]:
        """Where each running generation is: phase, prompt tokens, tokens prefilled so far, tokens generated."""
        return [{"phase": g.phase, "prompt_tokens": len(g.ids), "prefilled": g.pos, "generated": len(g.out),
                 "session_id": None if g.req.session is None else g.req.session.id} for g in list(self._active)]

    def bytes_for(self, max_seq_len: int) -> int:
        """Bytes of a session allocated for `max_seq_len` positions."""
        return self._per_position * max_seq_len + self._fixed

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        last_autosave_check = time.monotonic()
        while True:
            with self._cond:
                while not (self._inbox or self._queue or self._active or self.closing.is_set()):
                    self._cond.wait(timeout=1.0 if self.persist else None)
                    if self.persist and time.monotonic() - last_autosave_check > 1.0:
                        break
                self._queue.extend(self._inbox)
                self._inbox.clear()
            if self.closing.is_set():
                self._shutdown()
                return
            try:
                contended = self._start_ready()
                contended = self._decode_step() or contended
                self._prefill_step(contended)
                self._flush()
                if self.persist and time.monotonic() - last_autosave_check > 1.0:
                    last_autosave_check = time.monotonic()
                    self._autosave_idle()
            except Exception:  # a bug in the scheduler itself: fail what is running, keep serving
                log.exception("engine worker error")
                for gen in list(self._active):
                    self._fail(gen, RuntimeError("internal engine error"))

    def _start_ready(self) -> bool:
        """Run ready jobs and start ready generations, keeping arrival order per session; True if any ran."""
        blocked = {g.req.session.id for g in self._active if g.req.session is not None}
        waiting, ran = [], False
        for item in self._queue:
            if item.keys & blocked:
                blocked |= item.keys
                waiting.append(item)
                continue
            ran = True
            if isinstance(item, _Job):
                self._run_job(item)
            else:
                self._begin(item)
                if item in self._active:
                    blocked |= item.keys
        self._queue = waiting
        return ran

    def _run_job(self, job: _Job) -> None:
        t0 = time.monotonic()
        try:
            result, error = job.fn(*job.args), None
        except Exception as e:
            result, error = None, e
        self._busy_time[1] += time.monotonic() - t0
        _resolve(job.loop, job.future, result, error)

    # ------------------------------------------------------------------ generations (worker thread)
    def _begin(self, gen: Generation) -> None:
        """Validate a generation against the current state, allocate or checkpoint, and make it active."""
        if gen.cancelled.is_set():
            return self._finish_cancelled(gen)
        req = gen.req
        try:
            ss = req.session
            if ss is None:
                if req.prompt_ids is not None:
                    ids = list(req.prompt_ids)
                else:
                    gen.new_messages = list(req.messages)
                    gen.turn = self.chat.turn([], gen.new_messages)
                    ids = gen.turn.ids
                self._check_prompt(len(ids))
                max_len = len(ids) + req.max_tokens + 1 + (len(gen.turn.close) if gen.turn is not None else 1)
                self._reserve(self.bytes_for(max_len), transient=True)
                seed = secrets.randbits(62) if req.seed is None else req.seed  # stateless calls differ unless seeded
                gen.session = Session(self.model, max_len, chunk_size=self.chunk_size, seed=seed, progress=False)
                gen.reserved = gen.session.memory()["total"]
            else:
                if self.sessions.get(ss.id) is not ss:
                    raise NotFound(f"session {ss.id!r} was deleted")
                self._require_consistent(ss)
                session = ss.session
                gen.new_messages = self._session_delta(session, req.messages)
                history = [(m["role"], m["content"]) for m in session.transcript]
                gen.turn = self.chat.turn(history, gen.new_messages)
                ids = gen.turn.ids
                self._check_prompt(len(ids))
                if session.cursor + len(ids) + max(1, len(gen.turn.close)) > session.max_len - 1:
                    raise ContextLengthExceeded(
                        f"context full: {len(ids)} prompt tokens at position {session.cursor} need more than the "
                        f"session's max_seq_len {session.max_len}; resize the session")
                gen.session = session
                gen.before = session.checkpoint()
                ss.busy = True
            gen.ids = ids
            gen.phase = "prefill"
            self._active.append(gen)
        except Exception as e:
            self._fail(gen, e)

    def _prefill_step(self, contended: bool) -> None:
        """Prefill short prompts completely (batched); give one slice to the oldest long prompt unless other work
        ran in this round (`contended`) and long prefills already had their `background_share` of the worker."""
        prefilling = [g for g in self._active if g.phase == "prefill"]
        short = [g for g in prefilling if len(g.ids) - g.pos <= self.prefill_slice]
        t0 = time.monotonic()
        self._prefill_short(short)
        self._busy_time[1] += time.monotonic() - t0
        long = [g for g in prefilling if g not in short]
        if not long:
            return
        if not (contended or short):
            self._busy_time = [0.0, 0.0]  # alone: no share to keep
        else:
            background, foreground = self._busy_time
            if background > self.background_share * (background + foreground):
                return  # the others run first
        gen = long[0]
        n = self.prefill_slice  # alone: full slices (a slice has a fixed cost that grows with the position)
        if contended or short:
            n = max(16, min(n, int(self.slice_target_s / self._slice_s_per_token)))
        n = min(n, len(gen.ids) - gen.pos)
        t0 = time.monotonic()
        self._prefill(gen, n)
        spent = time.monotonic() - t0
        self._busy_time[0] += spent
        if n == self.prefill_slice:  # measured on full slices only: short ones would inflate it (fixed cost)
            self._slice_s_per_token = 0.5 * self._slice_s_per_token + 0.5 * spent / n

    def _prefill_short(self, gens: list[Generation]) -> None:
        """Prefill the rest of each prompt: equal-length chunks of all batchable rows in one forward
        (`forward_rows`), as many forwards as there are distinct remaining lengths; the others alone."""
        gens = [g for g in gens if not self._check_cancel(g)]
        batched = [g for g in gens if g.session.cursor <= self.batch_max_context] if can_batch(self.model) else []
        if len(batched) < 2:
            batched = []
        for gen in gens:
            if gen not in batched:
                self._prefill(gen, len(gen.ids) - gen.pos)
        while batched:
            n = min(len(g.ids) - g.pos for g in batched)
            chunks = [g.ids[g.pos:g.pos + n] for g in batched]
            try:
                logits = forward_rows([g.session for g in batched], chunks)
            except Exception:  # nothing was committed: prefill the rows one by one
                log.exception("batched prefill failed; prefilling the rows one by one")
                for gen in batched:
                    self._prefill(gen, len(gen.ids) - gen.pos)
                return
            for gen, chunk, rows in zip(batched, chunks, logits):
                for token, row in zip(chunk, rows):
                    gen.session.record_step(token, row)
                gen.pos += n
                if gen.pos == len(gen.ids):
                    self._prefilled(gen)
            batched = [g for g in batched if g.phase == "prefill" and g.pos < len(g.ids)]

    def _prefill(self, gen: Generation, n: int) -> None:
        if self._check_cancel(gen):
            return
        try:
            gen.session.append(gen.ids[gen.pos:gen.pos + n], role=None)
        except Exception as e:
            return self._fail(gen, e)
        gen.pos += n
        if gen.pos == len(gen.ids):
            self._prefilled(gen)

    def _prefilled(self, gen: Generation) -> None:
        """The prompt is in the cache: record the new messages, set up decoding, tell the client."""
        try:
            for (role, content), n_tokens in zip(gen.new_messages, gen.turn.counts if gen.turn else []):
                gen.session.add_message(role, content, n_tokens)
            closing = len(gen.turn.close) if gen.turn is not None else 1
            gen.budget = min(gen.req.max_tokens, gen.session.max_len - 1 - closing - gen.session.cursor)
            gen.reply_start = gen.session.checkpoint() if gen.stops else None
            gen.reseed = gen.req.seed  # the turn's first draw reseeds the session's sampler
            gen.phase = "decode"
            self._emit(gen, ("start", None))
        except Exception as e:
            self._fail(gen, e)

    def _decode_step(self) -> bool:
        """One token for every decoding generation: sample each, then one batched forward (or single ones).
        True if any generation was decoding."""
        decoding = [g for g in self._active if g.phase == "decode"]
        if not decoding:
            return False
        t0 = time.monotonic()
        rows: list[tuple[Generation, int]] = []
        for gen in decoding:
            if self._check_cancel(gen):
                continue
            try:
                if len(gen.out) >= gen.budget:
                    self._complete(gen, "length")
                    continue
                logits = gen.session.logits
                token = gen.session.sample(gen.req.temperature, gen.req.top_p, seed=gen.reseed)
                gen.reseed = None
                if token in self._stops:
                    self._complete(gen, "stop")
                    continue
                if gen.req.logprobs:
                    gen.entries.append(_logprob(logits, token, gen.req.top_logprobs, gen.ends[-1] if gen.ends else 0))
                rows.append((gen, token))
            except Exception as e:
                self._fail(gen, e)
        batchable = [(g, t) for g, t in rows if g.session.cursor <= self.batch_max_context]
        if len(batchable) < 2 or not can_batch(self.model):
            batchable = []
        single = [(g, t) for g, t in rows if (g, t) not in batchable]
        if batchable:
            try:
                logits = decode_step([g.session for g, _ in batchable], [t for _, t in batchable])
                for (gen, token), row in zip(batchable, logits):
                    gen.session.record_step(token, row)
                self.stats["batched_steps"] += 1
            except Exception:  # fall back to single steps (nothing was committed)
                log.exception("batched decode failed; decoding the rows one by one")
                single += batchable
                batchable = []
        for gen, token in single:
            try:
                gen.session.step(token)  # the session's one-token step: a CUDA-graph replay on CUDA
            except Exception as e:
                self._fail(gen, e)
                continue
        for gen, token in batchable + single:
            if gen.phase == "decode":
                self._accept(gen, token)
        self.stats["decode_steps"] += 1
        self.stats["decoded_tokens"] += len(rows)
        self._busy_time[1] += time.monotonic() - t0
        return True

    def _accept(self, gen: Generation, token: int) -> None:
        """A token is in the cache: extend the reply, honour stop strings, emit what became final.

        The reply's text is the decoding of all its tokens (`chat.ChatRules.decode`); trailing U+FFFD (a character
        whose bytes have not all arrived) and the last ``len(longest stop) - 1`` characters are held back."""
        gen.out.append(token)
        before = gen.ends[-1] if gen.ends else 0  # text up to here is final: a new stop string ends after it
        gen.text = self._decode_more(gen)
        settled = len(gen.text.rstrip("\ufffd"))
        gen.ends.append(settled)
        if gen.stops:
            lo = max(0, min(before, settled) - gen.hold - 1)
            hits = [i for i in (gen.text.find(s, lo) for s in gen.stops) if i >= 0]
            if hits:
                gen.cut = min(hits)
                return self._complete(gen, "stop")
        safe = settled - gen.hold
        if safe > gen.emitted:
            self._emit_delta(gen, safe)

    def _decode_more(self, gen: Generation) -> str:
        """The text of ``gen.out``, decoding only its tail: the text of the tokens after the anchor (a token count
        whose text is settled) is read off a decoding that starts a few tokens before it, minus the decoding of
        those few (so a tokenizer that treats a first token specially, e.g. dropping its leading space, is not
        misread). Falls back to decoding everything when that does not line up; `_complete` checks the result."""
        if len(gen.out) - gen.anchor > 32 and not gen.text.endswith("\ufffd"):
            gen.anchor, gen.anchor_text = len(gen.out) - 1, gen.text  # the text before this step's token
        context = max(0, gen.anchor - 4)
        head = self.chat.decode(gen.out[context:gen.anchor])
        tail = self.chat.decode(gen.out[context:])
        if head.endswith("\ufffd") or not tail.startswith(head):
            return self.chat.decode(gen.out)
        return gen.anchor_text + tail[len(head):]

    def _emit_delta(self, gen: Generation, upto: int, final: bool = False) -> None:
        """Send the text up to character `upto` and the logprobs of the tokens whose text it completes."""
        text = gen.text[gen.emitted:upto]
        if not gen.text.startswith(gen.sent):  # a tokenizer whose decoding rewrote text already sent
            log.warning("reply text changed after it was streamed; the rest of it is in the final result only")
            text, gen.sent = "", gen.text[:upto]
        n = len(gen.entries) if final else bisect.bisect_right(gen.ends, upto)
        entries = gen.entries[gen.emitted_entries:n] if gen.req.logprobs else []
        gen.sent += text
        gen.emitted = max(gen.emitted, upto)
        gen.emitted_entries = max(gen.emitted_entries, n)
        if text or entries:
            self._emit(gen, ("delta", (text, entries)))

    def _trim_at_stop(self, gen: Generation) -> None:
        """A stop string starts at character `gen.cut`: the reply becomes the text before it. Its tokens are the
        longest prefix of the generated tokens whose text lies inside it, then the tokens of any rest of it (a stop
        string that starts inside a token); the cache is rewound to hold exactly them."""
        content = gen.text[:gen.cut]
        n = len(gen.out)
        while n and not content.startswith(self.chat.decode(gen.out[:n])):
            n -= 1
        rest = content[len(self.chat.decode(gen.out[:n])):]
        kept = gen.out[:n] + (self.chat.encode(rest) if rest else [])
        del gen.entries[n:]
        if kept != gen.out and gen.reply_start is not None:
            session = gen.session
            session.rollback(gen.reply_start)  # the cache keeps only the reply
            if kept:
                session.append(list(kept), role=None)
        gen.out, gen.text = kept, content
        gen.ends = [min(e, len(content)) for e in gen.ends[:len(kept)]]

    def _complete(self, gen: Generation, finish: str) -> None:
        """Finish a generation: trim the cache to the reply, close the turn on a session, resolve the future."""
        try:
            session = gen.session
            if gen.cut is not None:
                self._trim_at_stop(gen)
            whole = self.chat.decode(gen.out)
            if whole != gen.text:  # pragma: no cover - incremental decoding drifted (logged; the result is exact)
                log.warning("incremental decoding of a reply differed from decoding it whole; the result uses the "
                            "whole decoding")
                gen.text = whole
            self._emit_delta(gen, len(gen.text), final=True)
            content = gen.text
            result = GenerationResult(content, finish, len(gen.ids), len(gen.out),
                                      list(gen.entries) if gen.req.logprobs else None)
            ss = gen.req.session
            if ss is not None:
                session.append(list(gen.turn.close), role=None)
                session.add_message("assistant", content, gen.turn.prompt + len(gen.out) + len(gen.turn.close))
                ss.publish()
        except Exception as e:
            return self._fail(gen, e)
        self._release(gen)
        self.stats["completed"] += 1
        self._flush()  # its last events go out before its result
        _resolve(gen.loop, gen.future, result, None)

    def _check_cancel(self, gen: Generation) -> bool:
        if gen.cancelled.is_set() or self.closing.is_set():
            self._finish_cancelled(gen)
            return True
        return False

    def _finish_cancelled(self, gen: Generation) -> None:
        self._rollback(gen)
        self._release(gen)
        self.stats["cancelled"] += 1
        self._flush()
        _resolve(gen.loop, gen.future, None, Cancelled("request cancelled"))

    def _fail(self, gen: Generation, error: BaseException) -> None:
        self._rollback(gen)
        self._release(gen)
        self.stats["failed"] += 1
        self._flush()
        _resolve(gen.loop, gen.future, None, error)

    def _rollback(self, gen: Generation) -> None:
        if gen.before is not None:
            try:
                gen.session.rollback(gen.before)
            except Exception:
                log.exception("rollback of session %s failed", gen.req.session.id)

    def _release(self, gen: Generation) -> None:
        if gen in self._active:
            self._active.remove(gen)
        if gen.req.session is not None:
            gen.req.session.busy = False
        gen.phase = "done"
        gen.reserved = 0

    def _emit(self, gen: Generation, event) -> None:
        """Queue an event for `gen`'s client; `_flush` hands the queued events over once per round."""
        if gen.on_events is not None:
            self._outbox.append((gen, event))

    def _flush(self) -> None:
        """Deliver the round's events: one wake-up per event loop, not one per token."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for gen, event in self._outbox:
            by_loop.setdefault(gen.loop, []).append((gen, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

    # ------------------------------------------------------------------ checks
    def _check_len(self, max_seq_len) -> int:
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise BadRequest(f"max_seq_len={max_seq_len!r}: expected an int >= 2")
        if max_seq_len > self.max_seq_len_limit:
            raise BadRequest(f"max_seq_len={max_seq_len}: larger than this server's limit {self.max_seq_len_limit} "
                             "(--max-seq-len-limit)")
        return max_seq_len

    def _reserve(self, nbytes: int, transient: bool = False, freed: int = 0) -> None:
        """MemoryBudgetExceeded (a session: 507) or MemoryBudgetBusy (a `transient` request: 429) unless `nbytes`
        more (after `freed` are released) fit the budget."""
        if self.memory_budget is None:
            return
        used = self.memory_in_use() - freed
        if used + nbytes > self.memory_budget:
            what = "this request" if transient else "this session"
            error = MemoryBudgetBusy if transient else MemoryBudgetExceeded
            raise error(f"{what} needs {nbytes} bytes but the sessions already hold {used} of the server's memory "
                        f"budget {self.memory_budget} bytes (--memory-budget-mb); delete sessions, ask for a smaller "
                        "max_seq_len or fewer tokens")

    def _check_prompt(self, n: int) -> None:
        if n > self.max_prompt_tokens:
            raise ContextLengthExceeded(f"prompt of {n} tokens is longer than this server's limit "
                                        f"{self.max_prompt_tokens} (--max-prompt-tokens)")

    def _claim_id(self, session_id: str | None, force: bool = False) -> str:
        sid = new_session_id() if session_id is None else check_session_id(session_id)
        if sid in self.sessions and not force:
            raise Conflict(f"session {sid!r} already exists (pass force to replace it)")
        if sid not in self.sessions and len(self.sessions) >= self.max_sessions:
            raise SessionLimit(f"session limit reached ({self.max_sessions} sessions, --max-sessions); delete one "
                               "first")
        return sid

    def _require_consistent(self, ss: ServerSession) -> None:
        if ss.verified:
            return
        problem = self.chat.transcript_problem(list(ss.session.transcript), ss.session.ids.tolist())
        if problem:
            raise Conflict(f"session {ss.id!r}: transcript does not match the cache: {problem}")
        ss.verified = True

    def _session_delta(self, session: Session, messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The messages to append: a leading system message equal to the stored one is dropped; a different one
        is refused unless the session is empty (docs/algorithm.md §6.5)."""
        transcript = session.transcript
        if messages and messages[0][0] == "system" and transcript:
            stored = transcript[0]
            if stored.get("role") == "system" and stored.get("content") == messages[0][1]:
                return messages[1:]
            raise Conflict("a leading system message can only be set while the session is empty (it differs from "
                           "the stored one, or the session has none)")
        return list(messages)

    # ------------------------------------------------------------------ session jobs (worker thread)
    def create_session(self, session_id: str | None, max_seq_len: int | None) -> ServerSession:
        """Job: allocate a new empty session."""
        sid = self._claim_id(session_id)
        n = self._check_len(self.session_max_seq_len if max_seq_len is None else max_seq_len)
        self._reserve(self.bytes_for(n))
        ss = ServerSession(sid, Session(self.model, n, chunk_size=self.chunk_size, progress=False))
        ss.verified = True
        self.sessions[sid] = ss
        return ss

    def delete_session(self, session_id: str) -> None:
        """Forget a session (a generation running on it finishes on the orphaned object); with `persist`, its
        autosave is deleted too (by the worker, after any earlier work)."""
        ss = self.get(session_id)
        del self.sessions[session_id]
        if ss.autosave_id is not None:
            self._submit(_Job(self._delete_autosave, (ss,), frozenset(), None, None))

    def rollback(self, ss: ServerSession, keep_messages: int) -> ServerSession:
        """Job: keep the first `keep_messages` messages; the cache is recreated and re-prefilled (docs/algorithm.md §6.2)."""
        s = ss.session
        if keep_messages != 0:  # keeping nothing also resets a session whose transcript does not match
            self._require_consistent(ss)
        if isinstance(keep_messages, bool) or not isinstance(keep_messages, int) \
                or not 0 <= keep_messages <= len(s.transcript):
            raise BadRequest(f"keep_messages={keep_messages!r}: expected an int in [0, {len(s.transcript)}]")
        kept = s.transcript[:keep_messages]
        n = sum(m["tokens"] for m in kept)
        fresh = Session(self.model, s.max_len, chunk_size=self.chunk_size, progress=False)
        if n:
            fresh.append(s.ids[:n], role=None)
        fresh.set_transcript(kept)
        ss.session = fresh
        ss.verified = True
        ss.publish()
        return ss

    def resize(self, ss: ServerSession, max_seq_len: int) -> ServerSession:
        """Job: grow the allocation (contents, cursor and transcript kept)."""
        n = self._check_len(max_seq_len)
        if n < ss.session.max_len:
            raise BadRequest(f"max_seq_len={n}: smaller than the session's {ss.session.max_len} (a session only "
                             "grows)")
        self._reserve(self.bytes_for(n) - ss.session.memory()["total"])
        ss.session.grow(n)
        ss.publish()
        return ss

    def save_snapshot(self, ss: ServerSession, title: str, description: str, tags: list[str]) -> str:
        """Job: write the session to the snapshot store; returns the snapshot id."""
        return self.store.save(ss.session, title=title, tags=tags, description=description)

    def load_snapshot(self, snapshot_id: str, session_id: str | None, force: bool,
                      max_seq_len: int | None, origin: str = "snapshot") -> ServerSession:
        """Job: verify a snapshot and hold it as a session (replacing an existing one only with `force`). The
        allocation must fit --max-seq-len-limit (checked by the store) and the memory budget (the budget is
        checked first with the allocation capped at the limit, so an oversized snapshot gets the limit error)."""
        sid = self._claim_id(session_id, force)
        if max_seq_len is not None:
            self._check_len(max_seq_len)
        n = min(max(self.store.info(snapshot_id).max_seq_len, max_seq_len or 0), self.max_seq_len_limit)
        old = self.sessions.get(sid)
        self._reserve(self.bytes_for(n), freed=0 if old is None else old.session.memory()["total"])
        s = self.store.load(snapshot_id, self.model, max_len=max_seq_len, max_len_limit=self.max_seq_len_limit,
                            chunk_size=self.chunk_size, progress=False)
        ss = ServerSession(sid, s, origin=f"{origin}:{snapshot_id}")
        self.sessions[sid] = ss
        return ss

    # ------------------------------------------------------------------ persistence (worker thread)
    def restore_autosaved(self) -> list[str]:
        """Load the newest autosave of every session (older ones are deleted); returns the restored ids. Call it
        before serving. Autosaves that fail to load are logged and kept."""
        newest: dict[str, object] = {}
        for info in self.store.list(self.model):
            sid = _autosaved_session(info.tags)
            if sid is None:
                continue
            older = newest.get(sid)
            if older is not None:
                self.store.delete((older if older.created_at <= info.created_at else info).id)
                if older.created_at > info.created_at:
                    continue
            newest[sid] = info
        restored = []
        for sid, info in newest.items():
            try:
                ss = self.load_snapshot(info.id, sid, False, None, origin="autosave")
            except Exception as e:
                log.warning("autosave %s of session %s not restored: %s", info.id, sid, e)
                continue
            ss.autosave_id, ss.dirty = info.id, False
            restored.append(sid)
        return restored

    def _autosave(self, ss: ServerSession) -> None:
        previous = ss.autosave_id
        ss.autosave_id = self.store.save(ss.session, title=f"autosave of session {ss.id}",
                                         tags=[AUTOSAVE_TAG, SESSION_TAG_PREFIX + ss.id])
        ss.dirty = False
        if previous is not None:
            self.store.delete(previous)

    def _delete_autosave(self, ss: ServerSession) -> None:
        if ss.autosave_id is not None:
            self.store.delete(ss.autosave_id)
            ss.autosave_id = None

    def _autosave_idle(self) -> None:
        now = time.monotonic()
        for ss in list(self.sessions.values()):
            if ss.dirty and not ss.busy and now - ss.changed_at >= self.autosave_idle_s:
                try:
                    self._autosave(ss)
                except Exception:
                    log.exception("autosave of session %s failed", ss.id)

    def _shutdown(self) -> None:
        with self._cond:
            self._queue.extend(self._inbox)
            self._inbox.clear()
        for gen in list(self._active):
            self._finish_cancelled(gen)
        for item in self._queue:
            if isinstance(item, _Job):
                if item.future is not None:
                    _resolve(item.loop, item.future, None, Cancelled("the server is stopping"))
                elif item.fn == self._delete_autosave:
                    item.fn(*item.args)
            else:
                self._finish_cancelled(item)
        self._queue = []
        if self.persist:
            for ss in list(self.sessions.values()):
                if ss.dirty or ss.autosave_id is None:
                    try:
                        self._autosave(ss)
                    except Exception:
                        log.exception("autosave of session %s failed", ss.id)


def _deliver(items: list) -> None:
    """On the event loop: hand each generation its events, in order."""
    grouped: dict = {}
    for gen, event in items:
        grouped.setdefault(gen, []).append(event)
    for gen, events in grouped.items():
        gen.on_events(events)


def _autosaved_session(tags) -> str | None:
    if AUTOSAVE_TAG not in tags:
        return None
    for tag in tags:
        if tag.startswith(SESSION_TAG_PREFIX):
            return tag[len(SESSION_TAG_PREFIX):]
    return None


def _resolve(loop, future, result, error) -> None:
    """Set an asyncio future from the worker thread (ignored if it was cancelled or its loop is gone)."""
    if future is None:
        if error is not None:
            log.warning("background job failed: %s", error)
        return

    def settle():
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass


def _logprob(logits: torch.Tensor, token: int, top: int, offset: int) -> TokenLogprob:
    lp = torch.log_softmax(logits.float(), dim=-1)
    alternatives = []
    if top:
        values, ids = torch.topk(lp, min(top, lp.numel()))
        alternatives = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprob(token, float(lp[token]), alternatives, offset)
