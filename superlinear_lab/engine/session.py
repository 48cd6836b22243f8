"""`Session`: a static cache + cursor + last logits + transcript on top of a `HybridLM` (docs/algorithm.md §6.1–6.2).

* `append(text | ids)` prefills in chunks (tqdm progress) at positions cursor … cursor+n-1.
* `stream(n, …)` / `generate(n, …)` sample from the stored logits (temperature 0 = greedy, then top-p,
  Decision D7 in docs/design.md); each accepted token is written before it is yielded, a stop token is never written; asking for
  more tokens than fit (`room`) is refused before anything is written.
* `sample(…)` draws one token without writing; `step(token)` writes one token through the decode path;
  `record_step(token, logits)` books a one-token forward that the caller ran on the cache (a batched decode over
  several sessions).
* Decoding (`decode`, engine/decode.py): on CUDA each one-token forward is a replay of a captured CUDA graph of the
  model's whole step over the static cache (eager step on CPU or if the capture fails, the model's `forward` while
  a trace or intervention hook is attached); greedy `generate` keeps the device one step ahead of the host. All
  paths give the same tokens, logits and states bit for bit.
* `checkpoint()` / `rollback(cp)` clone and restore the SSM/conv states, logits, cursor, transcript and sampler
  state; K/V is not copied (entries past a rewound cursor are simply overwritten later). A checkpoint whose
  positions were overwritten since (rollback to an earlier point, then new tokens) is refused.
* `fork()` is an independent deep copy; `grow(max_len)` reallocates a larger cache with the same contents.
* Public state API (the only way other code reads or writes a session's internals): `export_state()` →
  `SessionState`, `Session.from_state(model, state)` / `restore_state(state)`, `add_message(...)` and
  `set_transcript(...)`. Every state, checkpoint and transcript handed in is validated before anything is written.

Every error leaves the session exactly as it was: overflow and bad ids are checked before any write, and an
exception or KeyboardInterrupt in the middle of a prefill chunk restores the pre-call state (K/V written past
the cursor is unobservable).
"""
from __future__ import annotations

import contextlib
import copy
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..model.hybrid import HybridCache, HybridLM
from .decode import DECODE_MODES, Decoder, can_step, hooks_attached


# Decode steps and short chunks are made of sub-millisecond ops; on a few CPU cores the intra-op thread pool's
# fork-join overhead dominates them (10x slower than one thread when the machine is busy). Calls on at most this
# many tokens therefore run single-threaded on CPU.
SINGLE_THREAD_TOKENS = 64


@contextlib.contextmanager
def _threads_for(n_tokens: int, device: torch.device):
    if device.type != "cpu" or n_tokens > SINGLE_THREAD_TOKENS or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ContextOverflowError(ValueError):
    """The tokens do not fit the session's `max_len` (grow the session first)."""


class SessionError(RuntimeError):
    """A session operation that is not possible in the current state (e.g. generate before any append)."""


@dataclass(frozen=True)
class SessionState:
    """What a session holds apart from its logits and sampler state (what a snapshot stores).

    `Session.export_state()` returns CPU clones; `Session.from_state` / `restore_state` validate every field
    (types, dtypes, shapes against the model, finite values, token ids in the vocabulary, transcript) before
    writing anything. cursor = ``token_ids.numel()``.
    """

    max_len: int  # allocated positions; cursor < max_len
    token_ids: torch.Tensor  # int64 [cursor]
    keys: tuple  # per attention layer (in `model.routing_layers()` order): [1, H_KV, cursor, D], model dtype
    values: tuple  # same shapes as keys
    conv_states: torch.Tensor  # [n_mamba, 1, conv_dim, conv_kernel-1], model dtype
    ssm_states: torch.Tensor  # [n_mamba, 1, H, P, N] fp32
    transcript: tuple  # messages {"role": str, "content": str, "tokens": int >= 0}, sum of tokens <= cursor

    @property
    def cursor(self) -> int:
        return int(self.token_ids.numel()) if isinstance(self.token_ids, torch.Tensor) else -1


MESSAGE_KEYS = {"role", "content", "tokens"}


def check_transcript(messages, cursor: int, what: str = "transcript") -> list[dict]:
    """Validate transcript messages and return a deep copy as a list of plain dicts.

    Each message is exactly {"role": str, "content": str, "tokens": int >= 0}; the tokens of all messages add
    up to at most `cursor` (a message records tokens that are in the context). Raises ValueError naming the
    message and field.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"{what}: expected a list of messages, got {type(messages).__name__}")
    out, total = [], 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or set(msg) != MESSAGE_KEYS:
            keys = sorted(map(str, msg)) if isinstance(msg, dict) else type(msg).__name__
            raise ValueError(f"{what}[{i}]: expected exactly the keys {sorted(MESSAGE_KEYS)}, got {keys}")
        if not _is_text(msg["role"]) or not _is_text(msg["content"]):
            raise ValueError(f"{what}[{i}]: 'role' and 'content' must be strings (valid unicode)")
        tokens = msg["tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"{what}[{i}].tokens={tokens!r}: expected an int >= 0")
        total += tokens
        if total > cursor:
            raise ValueError(f"{what}: messages count {total} tokens by message {i}, more than the {cursor} tokens "
                             "in the context")
        out.append({"role": msg["role"], "content": msg["content"], "tokens": tokens})
    return out


def _check_tensor(value, name: str, dtype: torch.dtype, shape: tuple) -> None:
    """ValueError unless `value` is a finite tensor of exactly `dtype` and `shape` (no broadcasting)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(value).__name__}")
    if value.dtype != dtype or tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: got {value.dtype} {list(value.shape)}, expected {dtype} {list(shape)}")
    if value.dtype.is_floating_point and value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_text(x) -> bool:
    """A str that can be written as UTF-8 (no lone surrogates)."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Checkpoint:
    """State to return to with `Session.rollback`. Holds clones; K/V is shared with the session."""

    session_id: str  # session the checkpoint was taken on
    clock: int  # session clock when taken (orders it against later overwrites)
    cursor: int  # tokens in the context
    conv_states: torch.Tensor  # [n_mamba, B, conv_dim, conv_kernel-1]
    ssm_states: torch.Tensor  # [n_mamba, B, H, P, N] fp32
    logits: torch.Tensor | None  # fp32 [vocab] or None
    transcript: tuple  # deep copy of the transcript messages
    rng_state: torch.Tensor  # sampler generator state


def _check_sampling(temperature, top_p) -> None:
    """ValueError unless temperature is a number >= 0 (0 = greedy) and top_p a number in (0, 1]."""
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}: expected a number >= 0 (0 = greedy)")
    if isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1]")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """docs/algorithm.md §6.1 sampler: argmax at temperature 0; else softmax(logits / T) in fp32, top-p (smallest most-probable
    set with cumulative probability >= top_p, at least one token, renormalised), one multinomial draw."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or infinite values: cannot sample (temperature > 0)")
    # Shift by the max before dividing, in float64: (logits - max) / T <= 0, so a tiny T (even one that is 0 in
    # float32) gives -inf (probability 0) for every token but the best ones instead of inf - inf = NaN.
    shifted = logits.double() - logits.double().max()
    probs = torch.softmax((shifted / temperature).float(), dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly above each token
        keep = before < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


class Session:
    """One token row with its static cache (batch 1).

    Args:
        model: a `HybridLM` (eval mode; the session runs it under `torch.no_grad`).
        max_len: allocated positions; `append` needs cursor + n < max_len (one slot stays free for generation).
        chunk_size: prefill chunk length.
        seed: sampler seed.
        progress: show a tqdm bar for appends of more than one chunk (None), always (True) or never (False).
        decode: how `stream`/`generate` run each one-token forward — "auto": the model's one-token step over the
            static cache, replayed as a captured CUDA graph on CUDA (`engine.decode.Decoder`; eager when the
            model is on CPU or the capture fails, which is logged); "eager": the same step without a graph;
            "forward": the model's plain `forward` at the cursor. All three compute the same logits bit for bit.
            While a trace or intervention hook is attached, steps use `forward` (only it calls the hooks).

    Example::

        s = Session(load_model(), max_len=4096)
        s.append("Hello")
        print(s.generate_text(20))
    """

    def __init__(self, model: HybridLM, max_len: int = 4096, *, chunk_size: int = 4096, seed: int = 0,
                 progress: bool | None = None, decode: str = "auto", _cache: HybridCache | None = None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r}: expected an int >= 1")
        self.decode = decode
        self._decoder: Decoder | None = None  # built on the first step over the current cache
        self.decode_path: str | None = None  # how the last generated token ran: "graph", "eager" or "forward"
        self.model = model
        self.tokenizer = model.tokenizer
        self.cache = _cache if _cache is not None else model.new_cache(max_len)
        self.chunk_size = chunk_size
        self.progress = progress
        self.id = uuid.uuid4().hex
        self._transcript: list[dict] = []  # read through `transcript`; changed by append/generate/add_message/...
        self._cursor = 0
        self._logits: torch.Tensor | None = None
        self._token_ids = torch.full((self.cache.max_len,), -1, dtype=torch.int64)
        self._gen = torch.Generator().manual_seed(seed)
        self._clock = 0  # counts writes; orders checkpoints against overwrites
        self._high = 0  # highest cursor ever reached
        self._overwrites: list[tuple[int, int]] = []  # (clock, start position) of writes below `_high`
        self._lineage: dict[str, float] = {self.id: float("inf")}  # session id -> last clock shared with it

    # ------------------------------------------------------------------ state
    @property
    def cursor(self) -> int:
        """Tokens in the context (current_pos): the next token goes to this position."""
        return self._cursor

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def transcript(self) -> tuple[dict, ...]:
        """The messages, oldest first: {"role", "content", "tokens"} each (copies: change the transcript with
        `add_message` / `set_transcript`, or through `append(..., role=...)` and generation)."""
        return tuple(dict(m) for m in self._transcript)

    @property
    def room(self) -> int:
        """Tokens that still fit: max_len - 1 - cursor (one slot stays free, so cursor + n < max_len)."""
        return self.max_len - 1 - self._cursor

    @property
    def logits(self) -> torch.Tensor | None:
        """fp32 [vocab]: next-token logits after the last token, or None (fresh or restored session)."""
        return self._logits

    @property
    def ids(self) -> torch.Tensor:
        """int64 [cursor]: the token ids of the context."""
        return self._token_ids[: self._cursor].clone()

    def text(self) -> str:
        """The context decoded as text."""
        return self.tokenizer.decode(self.ids.tolist())

    def memory(self) -> dict[str, int]:
        """Bytes by kind: kv (allocated), kv_used (up to the cursor), conv, ssm, token_ids, logits, total."""
        mem = self.cache.memory()
        mem["kv_used"] = mem["kv"] * self._cursor // self.max_len
        mem["token_ids"] = self._token_ids.numel() * self._token_ids.element_size()
        mem["logits"] = 0 if self._logits is None else self._logits.numel() * self._logits.element_size()
        mem["total"] = mem["kv"] + mem["conv"] + mem["ssm"] + mem["token_ids"] + mem["logits"]
        return mem

    def __repr__(self) -> str:
        return f"Session(id={self.id[:8]}, cursor={self._cursor}, max_len={self.max_len}, messages={len(self._transcript)})"

    # ------------------------------------------------------------------ public state API
    def add_message(self, role: str, content: str, tokens: int) -> None:
        """Record a transcript message for `tokens` tokens already in the context (e.g. appended with
        ``role=None`` in several pieces). Raises ValueError (nothing recorded) if the message is malformed or the
        transcript would count more tokens than the context holds."""
        self._transcript[:] = check_transcript(
            self._transcript + [{"role": role, "content": content, "tokens": tokens}], self._cursor)

    def set_transcript(self, messages) -> None:
        """Replace the transcript (validated as in `check_transcript`; deep-copied). Tokens are not touched."""
        self._transcript[:] = check_transcript(messages, self._cursor)

    def export_state(self) -> SessionState:
        """The session's contents as CPU clones (K/V truncated to the cursor); see `SessionState`."""
        cur = self._cursor
        return SessionState(
            max_len=self.max_len, token_ids=self._token_ids[:cur].clone(),
            keys=tuple(k[:, :, :cur].contiguous().cpu().clone() for k in self.cache.keys),
            values=tuple(v[:, :, :cur].contiguous().cpu().clone() for v in self.cache.values),
            conv_states=self.cache.conv_states.cpu().clone(), ssm_states=self.cache.ssm_states.cpu().clone(),
            transcript=tuple(copy.deepcopy(self._transcript)))

    @staticmethod
    def state_layout(model: HybridLM, cursor: int) -> dict:
        """(dtype, shape) of each `SessionState` tensor for `model` at `cursor` tokens: {"token_ids": …,
        "keys": [… per attention layer], "values": [...], "conv_states": …, "ssm_states": …}. Allocates only a
        one-position cache (to read the model's cache geometry)."""
        probe = model.new_cache(1)

        def kv(t):
            return t.dtype, (1, t.shape[1], cursor, t.shape[3])
        return {"token_ids": (torch.int64, (cursor,)), "keys": [kv(t) for t in probe.keys],
                "values": [kv(t) for t in probe.values],
                "conv_states": (probe.conv_states.dtype, tuple(probe.conv_states.shape)),
                "ssm_states": (probe.ssm_states.dtype, tuple(probe.ssm_states.shape))}

    @staticmethod
    def check_state(model: HybridLM, state: SessionState, max_len: int | None = None) -> int:
        """Validate `state` for `model` (and an allocation of `max_len` >= state.max_len); returns the allocation
        length. Raises ValueError naming the field, the value and what was expected. Allocates nothing large."""
        if not isinstance(state, SessionState):
            raise ValueError(f"state: expected a SessionState, got {type(state).__name__}")
        if not _is_int(state.max_len) or state.max_len < 1:
            raise ValueError(f"state.max_len={state.max_len!r}: expected an int >= 1")
        n = state.max_len if max_len is None else max_len
        if not _is_int(n) or n < state.max_len:
            raise ValueError(f"max_len={max_len!r}: expected an int >= the state's max_len {state.max_len}")
        ids = state.token_ids
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            shown = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"state.token_ids: got {shown}, expected int64 [cursor]")
        cur = ids.numel()
        if cur >= state.max_len:
            raise ValueError(f"state: cursor {cur} (token_ids length) must be < max_len {state.max_len}")
        vocab = model.cfg.vocab_size
        if cur and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"state.token_ids: values outside [0, {vocab})")
        layout = Session.state_layout(model, cur)
        for kind in ("keys", "values"):
            got = getattr(state, kind)
            if not isinstance(got, (list, tuple)) or len(got) != len(layout[kind]):
                raise ValueError(f"state.{kind}: expected {len(layout[kind])} tensors (one per attention layer)")
            for j, (t, (dtype, shape)) in enumerate(zip(got, layout[kind])):
                _check_tensor(t, f"state.{kind}[{j}]", dtype, shape)
        for kind in ("conv_states", "ssm_states"):
            _check_tensor(getattr(state, kind), f"state.{kind}", *layout[kind])
        check_transcript(state.transcript, cur, "state.transcript")
        return n

    @classmethod
    def from_state(cls, model: HybridLM, state: SessionState, max_len: int | None = None, **kwargs) -> "Session":
        """A new session on `model` holding `state` (allocated at `max_len`, default state.max_len; larger is
        allowed). Logits are None until the next append. `kwargs` go to `Session(...)`. The state is validated
        before the cache is allocated (ValueError)."""
        n = cls.check_state(model, state, max_len)
        session = cls(model, n, **kwargs)
        session.restore_state(state)
        return session

    def restore_state(self, state: SessionState) -> None:
        """Replace this session's contents by `state` (validated first: on ValueError nothing changed). The
        allocation must hold it (state.max_len <= max_len; `grow` first otherwise). Logits become None, the
        sampler state is kept, and checkpoints taken before can no longer be rolled back to (unless at cursor 0)."""
        self.check_state(self.model, state, self.max_len)
        cur = state.cursor
        cache = self.cache
        for dst, src in zip(cache.keys + cache.values, state.keys + state.values):
            dst[:, :, :cur].copy_(src)
        cache.conv_states.copy_(state.conv_states)
        cache.ssm_states.copy_(state.ssm_states)
        self._token_ids[:cur] = state.token_ids
        self._begin_write_at(0)
        self._cursor = cur
        self._high = max(self._high, cur)
        self._logits = None
        self._transcript[:] = check_transcript(state.transcript, cur)

    # ------------------------------------------------------------------ input
    def _as_ids(self, data) -> list[int]:
        if isinstance(data, str):
            return self.tokenizer.encode(data)
        if isinstance(data, torch.Tensor):
            if data.dim() != 1 or data.dtype.is_floating_point or data.dtype == torch.bool:
                raise ValueError(f"ids: expected a 1-D int tensor, got {data.dtype} {tuple(data.shape)}")
            ids = data.tolist()
        else:
            ids = list(data)
        vocab = self.model.cfg.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"ids[{i}]={t!r}: expected an int token id in [0, {vocab})")
        return ids

    def _check_fits(self, n: int) -> None:
        if n > self.room:
            raise ContextOverflowError(f"{n} tokens at cursor {self._cursor} need cursor + n < max_len={self.max_len}; "
                                       f"call grow({self._cursor + n + 1}) or more first")

    def _begin_write(self) -> None:
        self._begin_write_at(self._cursor)

    def _begin_write_at(self, position: int) -> None:
        self._clock += 1
        if position < self._high:
            self._overwrites.append((self._clock, position))

    def _internal_state(self):
        return (self._cursor, self._logits, len(self._transcript), self.cache.conv_states.clone(),
                self.cache.ssm_states.clone(), self._clock, self._high, len(self._overwrites))

    def _restore_internal(self, saved) -> None:
        cursor, logits, n_msgs, conv, ssm, clock, high, n_over = saved
        self._cursor, self._logits = cursor, logits
        del self._transcript[n_msgs:]
        self.cache.conv_states.copy_(conv)
        self.cache.ssm_states.copy_(ssm)
        self._clock, self._high = clock, high
        del self._overwrites[n_over:]

    def append(self, data, role: str | None = "user", *, chunk_size: int | None = None,
               progress: bool | None = None) -> int:
        """Prefill `data` (text or token ids) after the cursor; returns the number of tokens appended.

        The transcript gets {"role": role, "content": text, "tokens": n} unless role is None. Raises
        ContextOverflowError / ValueError before any write; on any exception (KeyboardInterrupt included)
        the session is restored to its state before the call.
        """
        ids = self._as_ids(data)
        if not ids:
            raise ValueError("append: nothing to append (empty text or ids)")
        chunk = self.chunk_size if chunk_size is None else chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk_size={chunk!r}: expected an int >= 1")
        self._check_fits(len(ids))
        from tqdm.auto import tqdm

        wanted = self.progress if progress is None else progress
        show = len(ids) > chunk if wanted is None else bool(wanted)
        saved = self._internal_state()
        tensor = torch.tensor(ids, dtype=torch.int64)
        device = self.model.device
        try:
            self._begin_write()
            start = self._cursor
            logits = None
            with torch.no_grad(), tqdm(total=len(ids), unit="tok", disable=not show, desc="prefill",
                                       leave=False) as bar:
                for c0 in range(0, len(ids), chunk):
                    part = tensor[c0:c0 + chunk]
                    self._token_ids[start + c0:start + c0 + part.numel()] = part
                    with _threads_for(part.numel(), device):
                        logits = self.model(part.to(device)[None], self.cache, start + c0)
                    bar.update(part.numel())
            self._cursor = start + len(ids)
            self._high = max(self._high, self._cursor)
            self._logits = logits[0, -1].clone()
            if role is not None:
                self._transcript.append({"role": role, "content": self.tokenizer.decode(ids), "tokens": len(ids)})
        except BaseException:
            self._restore_internal(saved)
            raise
        return len(ids)

    # ------------------------------------------------------------------ generation
    def step(self, token: int) -> None:
        """Write one token id at the cursor through the session's decode path (the one-token step: a CUDA-graph
        replay on CUDA, see `decode`), atomically; the logits become the next token's. The same result as
        ``append([token], role=None)`` (no transcript message), for decoding loops that sample themselves.
        Raises ValueError (a bad id) or ContextOverflowError before anything is written."""
        vocab = self.model.cfg.vocab_size
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ValueError(f"token={token!r}: expected an int token id in [0, {vocab})")
        self._step(token)

    def _step(self, token: int) -> None:
        """Write one (valid) token at the cursor (one-token forward), atomically."""
        self._check_fits(1)
        saved = self._internal_state()
        try:
            with torch.no_grad(), _threads_for(1, self.model.device):
                logits, path = self._one_token(token)
            self.record_step(token, logits)
            self.decode_path = path
        except BaseException:
            self._restore_internal(saved)
            raise

    def _one_token(self, token: int) -> tuple[torch.Tensor, str]:
        """fp32 logits [vocab] of `token` at the cursor (K/V and states written into the cache) and the path taken."""
        model = self.model
        if self.decode == "forward" or not can_step(model) or hooks_attached(model):
            return model(torch.tensor([[token]], device=model.device), self.cache, self._cursor)[0, -1], "forward"
        decoder = self._current_decoder()
        return decoder(token, self._cursor, graph=self.decode == "auto"), decoder.path

    def _current_decoder(self) -> Decoder:
        """The one-token `Decoder` over the current cache (a new one, to be captured anew, after `grow`)."""
        if self._decoder is None or self._decoder.cache is not self.cache:
            self._decoder = Decoder(self.model, self.cache)
        return self._decoder

    @property
    def decode(self) -> str:
        """How one-token steps run: "auto", "eager" or "forward" (see the class docstring); settable."""
        return self._decode

    @decode.setter
    def decode(self, mode: str) -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"decode={mode!r}: expected one of {DECODE_MODES}")
        self._decode = mode

    @property
    def decode_fallback(self) -> str | None:
        """Why steps run eagerly although decode="auto" asks for a CUDA graph (None when a graph runs, or no
        step ran in that mode yet)."""
        return None if self._decoder is None else self._decoder.fallback_reason

    def sample(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> int:
        """Draw the next token from `logits` with the session's sampler (`seed` reseeds it first); writes nothing.
        Raises SessionError if there are no logits (fresh or restored session), ValueError for bad arguments."""
        _check_sampling(temperature, top_p)
        if self._logits is None:
            raise SessionError("no logits to sample from: append tokens first (a fresh or restored session has none)")
        if seed is not None:
            self._gen.manual_seed(seed)
        return _sample(self._logits, float(temperature), float(top_p), self._gen)

    def record_step(self, token: int, logits: torch.Tensor) -> None:
        """Book-keeping of a one-token forward that the caller ran on `self.cache` at `self.cursor` (e.g. a batched
        decode over several sessions): the token goes to position `cursor`, the cursor advances, `logits`
        (fp32 [vocab], the forward's output for that token) become the session's logits.

        Checks (ValueError / ContextOverflowError) come first; on an error nothing is recorded — the caller, who
        already wrote K/V and states into the cache, should `rollback` to a checkpoint taken before its forward.
        """
        vocab = self.model.cfg.vocab_size
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ValueError(f"token={token!r}: expected an int token id in [0, {vocab})")
        if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or tuple(logits.shape) != (vocab,):
            shown = (f"{logits.dtype} {list(logits.shape)}" if isinstance(logits, torch.Tensor)
                     else type(logits).__name__)
            raise ValueError(f"logits: got {shown}, expected float32 [{vocab}]")
        self._check_fits(1)
        self._begin_write()
        self._token_ids[self._cursor] = token
        self._cursor += 1
        self._high = max(self._high, self._cursor)
        self._logits = logits.detach().clone()

    def stream(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               stop: Iterable[int] | int | None = None, seed: int | None = None,
               role: str | None = "assistant") -> Iterator[int]:
        """Yield up to `max_new_tokens` sampled token ids; each is in the cache before it is yielded.

        Raises ContextOverflowError before anything is written if `max_new_tokens` tokens would not fit (the
        message says how many do).

        Stops early on <|eos|> or a `stop` id (that token is neither written nor yielded). Stopping the
        consumer early keeps what was yielded. The transcript gets one message with the generated text.
        Arguments are validated when `stream` is called, not at the first `next`.
        """
        return self._stream(*self._generation_args(max_new_tokens, temperature, top_p, stop, seed, role))

    def _generation_args(self, max_new_tokens, temperature, top_p, stop, seed, role) -> tuple:
        """Validate `stream`/`generate` arguments (nothing written before); (n, temperature, top_p, stop ids, role)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 0")
        _check_sampling(temperature, top_p)
        stop_ids = {self.tokenizer.eos_id} | set(self._as_ids([stop] if isinstance(stop, int) else (stop or [])))
        room = self.room
        if max_new_tokens > room:
            raise ContextOverflowError(f"max_new_tokens={max_new_tokens}: only {room} tokens fit at cursor "
                                       f"{self._cursor} (max_len={self.max_len}); call grow("
                                       f"{self._cursor + max_new_tokens + 1}) or more first, or ask for at most {room}")
        if self._logits is None:
            raise SessionError("no logits to sample from: append tokens first (a fresh or restored session has none)")
        if seed is not None:
            self._gen.manual_seed(seed)
        return max_new_tokens, float(temperature), float(top_p), stop_ids, role

    def _stream(self, n, temperature, top_p, stop_ids, role) -> Iterator[int]:
        produced: list[int] = []
        try:
            for _ in range(n):
                token = self.sample(temperature, top_p)
                if token in stop_ids:
                    break
                self._step(token)
                produced.append(token)
                yield token
        finally:
            self._record_message(produced, role)

    def _record_message(self, produced: list[int], role: str | None) -> None:
        if produced and role is not None:
            self._transcript.append({"role": role, "content": self.tokenizer.decode(produced), "tokens": len(produced)})

    def generate(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Iterable[int] | int | None = None, seed: int | None = None,
                 role: str | None = "assistant") -> list[int]:
        """All tokens of `stream(...)` as a list (the same tokens, logits and session state).

        Greedy generation (temperature 0) on the one-token step ("auto"/"eager") runs pipelined: each step also
        computes the next greedy token on the device and the next step is queued before the host has read that
        token, so the device never waits for the host's bookkeeping. A step queued for a token that turns out to
        stop the generation is undone (its states restored; its K/V lie past the cursor).
        """
        args = self._generation_args(max_new_tokens, temperature, top_p, stop, seed, role)
        n, temperature = args[0], args[1]
        if n and temperature == 0 and self.decode != "forward" and can_step(self.model) \
                and not hooks_attached(self.model):
            return self._generate_pipelined(n, args[3], args[4])
        return list(self._stream(*args))

    def _generate_pipelined(self, n: int, stop_ids: set, role: str | None) -> list[int]:
        """Greedy `generate` with the device one step ahead of the host (see `generate`); n <= room was checked.

        Each queued step keeps a snapshot of the conv/SSM states before it. Token t is committed (`record_step`)
        once step t has finished, while step t + 1 runs; `snap` is always the states of the committed cursor
        (None: the cache holds exactly them), restored if a queued step is undone or anything raises.
        """
        decoder, use_graph, cache = self._current_decoder(), self.decode == "auto", self.cache
        on_cuda = decoder.position.is_cuda
        produced: list[int] = []
        token = int(torch.argmax(self._logits))  # the session's sampler at temperature 0
        if token in stop_ids:
            return produced
        pending = []  # queued steps, oldest first: (states before it, its logits, its greedy next token, event)

        def queue(position: int | None = None) -> None:
            before = (cache.conv_states.clone(), cache.ssm_states.clone())
            if position is not None:  # the first step; later ones take token and position from the device
                decoder.ids.fill_(token)
                decoder.position.fill_(position)
            logits = decoder.launch(use_graph).clone()
            nxt = decoder.ids.view(1).clone()
            done = None
            if on_cuda:
                host = torch.empty(1, dtype=torch.int64, pin_memory=True)
                host.copy_(nxt, non_blocking=True)
                nxt, done = host, torch.cuda.Event()
                done.record()
            pending.append((before, logits, nxt, done))

        snap = None
        try:
            with torch.no_grad(), _threads_for(1, self.model.device):
                queue(self._cursor)
                snap = pending[0][0]
                for t in range(n):
                    if t + 1 < n:
                        queue()  # step t + 1, for the token step t is computing: undone if that token stops
                    _, logits, nxt, done = pending.pop(0)
                    if done is not None:
                        done.synchronize()
                    self.record_step(token, logits)  # step t has finished: token t is in the cache
                    produced.append(token)
                    self.decode_path = decoder.path
                    snap = pending[0][0] if pending else None
                    token = int(nxt[0])
                    if token in stop_ids:
                        break
                if pending:
                    self._undo_queued(snap)
        except BaseException:
            self._undo_queued(snap)
            raise
        finally:
            self._record_message(produced, role)
        return produced

    def _undo_queued(self, snap) -> None:
        """After queued steps that are not committed (waited for first): restore the committed cursor's conv/SSM
        states `snap` (None: nothing to restore). Their K/V lie at positions >= cursor; as after any write there,
        positions below the highest cursor ever reached count as overwritten (checkpoints covering them are refused)."""
        if self.cache.conv_states.is_cuda:
            torch.cuda.current_stream().synchronize()
        if snap is not None:
            self.cache.conv_states.copy_(snap[0])
            self.cache.ssm_states.copy_(snap[1])
        self._begin_write_at(self._cursor)

    def generate_text(self, max_new_tokens: int, **kwargs) -> str:
        """`generate(...)` decoded as text."""
        return self.tokenizer.decode(self.generate(max_new_tokens, **kwargs))

    # ------------------------------------------------------------------ checkpoints, forks, growth
    def checkpoint(self) -> Checkpoint:
        """Capture the state to return to (cheap: K/V is not copied)."""
        return Checkpoint(self.id, self._clock, self._cursor, self.cache.conv_states.clone(),
                          self.cache.ssm_states.clone(), None if self._logits is None else self._logits.clone(),
                          tuple(copy.deepcopy(self._transcript)), self._gen.get_state())

    def rollback(self, cp: Checkpoint) -> None:
        """Return bit-exactly to `cp` (cursor, logits, states, transcript, sampler).

        Raises SessionError if `cp` belongs to another session or positions below its cursor were overwritten
        since it was taken; ValueError if `cp` is malformed (cursor outside what was written, clock in the future,
        states or logits of the wrong dtype/shape or not finite, a bad transcript or sampler state). Everything is
        checked before anything is restored: on any error the session is unchanged.
        """
        if not isinstance(cp, Checkpoint):
            raise TypeError(f"cp: expected a Checkpoint, got {type(cp).__name__}")
        if not isinstance(cp.session_id, str):
            raise ValueError(f"cp.session_id={cp.session_id!r}: expected a str")
        if not _is_int(cp.clock) or cp.clock < 0:
            raise ValueError(f"cp.clock={cp.clock!r}: expected an int >= 0")
        shared = self._lineage.get(cp.session_id)
        if shared is None or cp.clock > shared:
            raise SessionError("checkpoint belongs to another session (or was taken on a parent after the fork)")
        if cp.clock > self._clock:
            raise ValueError(f"cp.clock={cp.clock}: in the future of this session (its clock is {self._clock})")
        if not _is_int(cp.cursor) or not 0 <= cp.cursor <= min(self._high, self.max_len - 1):
            raise ValueError(f"cp.cursor={cp.cursor!r}: expected an int in [0, {min(self._high, self.max_len - 1)}] "
                             "(positions this session has written)")
        for clock, position in self._overwrites:
            if clock > cp.clock and position < cp.cursor:
                raise SessionError(f"checkpoint at cursor {cp.cursor} is stale: position {position} was overwritten "
                                   "after it was taken")
        cache = self.cache
        _check_tensor(cp.conv_states, "cp.conv_states", cache.conv_states.dtype, cache.conv_states.shape)
        _check_tensor(cp.ssm_states, "cp.ssm_states", cache.ssm_states.dtype, cache.ssm_states.shape)
        if cp.logits is not None:
            _check_tensor(cp.logits, "cp.logits", torch.float32, (self.model.cfg.vocab_size,))
        transcript = check_transcript(cp.transcript, cp.cursor, "cp.transcript")
        if not isinstance(cp.rng_state, torch.Tensor):
            raise ValueError(f"cp.rng_state: expected a tensor, got {type(cp.rng_state).__name__}")
        try:  # validated on a scratch generator, so a bad state cannot leave this session half-restored
            torch.Generator().set_state(cp.rng_state)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"cp.rng_state: not a valid CPU generator state ({e})") from None
        cache.conv_states.copy_(cp.conv_states)
        cache.ssm_states.copy_(cp.ssm_states)
        self._logits = None if cp.logits is None else cp.logits.clone()
        self._cursor = cp.cursor
        self._transcript[:] = transcript
        self._gen.set_state(cp.rng_state)

    def fork(self, seed: int | None = None) -> "Session":
        """An independent copy (cache, cursor, logits, transcript, sampler state; `seed` reseeds the copy).
        Checkpoints taken on this session before the fork also work on the fork."""
        other = Session(self.model, chunk_size=self.chunk_size, progress=self.progress, decode=self.decode,
                        _cache=self.cache.clone())
        other._cursor = self._cursor
        other._logits = None if self._logits is None else self._logits.clone()
        other._token_ids = self._token_ids.clone()
        other._transcript = copy.deepcopy(self._transcript)
        other._gen.set_state(self._gen.get_state())
        if seed is not None:
            other._gen.manual_seed(seed)
        other._clock, other._high = self._clock, self._high
        other._overwrites = list(self._overwrites)
        other._lineage = {sid: min(limit, self._clock) for sid, limit in self._lineage.items()}
        other._lineage[other.id] = float("inf")
        return other

    def grow(self, max_len: int) -> None:
        """Reallocate the cache with `max_len` >= the current one, keeping everything (checkpoints stay valid)."""
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < self.max_len:
            raise ValueError(f"max_len={max_len!r}: expected an int >= the current max_len {self.max_len}")
        if max_len == self.max_len:
            return
        cache = self.cache.clone(max_len)
        ids = torch.full((max_len,), -1, dtype=torch.int64)
        ids[: self._token_ids.numel()] = self._token_ids
        self.cache, self._token_ids = cache, ids
        self._decoder = None  # its graph and entries belong to the old allocation: the next step captures anew

    # ------------------------------------------------------------------ tracing
    @contextlib.contextmanager
    def trace(self, queries=None, profile_queries=None, layers=None):
        """``with session.trace(...) as tr: session.append(doc)`` — a `RoutingTrace` of the calls inside
        (`RoutingTrace.capture`), whose tokens are the session's whole context up to the trace's length."""
        with self.model.trace(queries=queries, profile_queries=profile_queries, layers=layers) as tr:
            yield tr
        ids = self._token_ids[: tr.length].clone()
        tr.token_ids = ids
        tr.tokens = self.tokenizer.token_strings(ids.tolist())
