"""Public entry points: `span_search` and `superlinear_attention` (docs/design.md, Public API).

Both validate every argument before any computation, derive the row starts from the left-padded
mask, then dispatch to a backend: "oracle" (dense, small L, tests), "torch" (efficient, any
device) or "triton" (GPU kernels); "auto" picks triton on CUDA tensors, torch otherwise. All
backends return the same routing and outputs equal within dtype tolerance.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from .config import SpanConfig

BACKENDS = ("auto", "oracle", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class SearchResult:
    """Routing of every (batch, query head, query): the top-K stripes and their spans (docs/algorithm.md §2.4).

    All fields have shape [B, H_Q, L_Q, K], sorted by search value (descending; ties → earlier anchor).
    """

    qstart: torch.Tensor  # int32, inclusive span start; -1 where the slot is invalid
    qanchor: torch.Tensor  # int32, anchor position (right end of the backward span); -1 if invalid
    qend: torch.Tensor  # int32, inclusive span end after the forward-end adjustment; -1 if invalid
    values: torch.Tensor  # fp32, raw search scores <Q1, K(anchor)>; -inf if invalid
    gate: torch.Tensor | None = None  # fp32 gate weights softmax(values) (superlinear_attention only)

    @property
    def valid(self) -> torch.Tensor:
        """bool [B, H_Q, L_Q, K]: slots holding a real candidate."""
        return self.qanchor >= 0

    def detach(self) -> "SearchResult":
        return replace(self, values=self.values.detach(),
                       gate=None if self.gate is None else self.gate.detach())


@dataclass(frozen=True)
class Prepared:
    """Validated inputs shared by the backends."""

    cache_position: torch.Tensor  # int64 [L_Q] on the tensors' device
    row_start: torch.Tensor  # int64 [B]: s, index of the first valid key of each row
    q_max: int  # largest query position of the call
    l_kv: int


def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_inputs(q1: torch.Tensor, k: torch.Tensor, cfg, backend: str, q2: torch.Tensor | None = None,
                  v: torch.Tensor | None = None) -> None:
    """The checks of the config, the backend name and the tensors' metadata (types, dims, dtypes, devices, shapes,
    GQA): they read no tensor value, so they cost no device synchronisation."""
    if not isinstance(cfg, SpanConfig):
        raise TypeError(f"cfg: expected a SpanConfig, got {type(cfg).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    named = [("q1", q1), ("k", k)] + ([("q2", q2), ("v", v)] if q2 is not None else [])
    for name, x in named:
        _check_tensor(name, x, 4)
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype {x.dtype} not supported; expected float16, bfloat16 or float32")
    dtype, device = q1.dtype, q1.device
    for name, x in named[1:]:
        if x.dtype != dtype:
            raise TypeError(f"{name}: dtype {x.dtype} differs from q1's {dtype}; nothing is cast silently")
        if x.device != device:
            raise ValueError(f"{name}: on {x.device} but q1 is on {device}")
    b, h_q, l_q, d = q1.shape
    b_k, h_kv, l_kv, d_k = k.shape
    if q2 is not None and q2.shape != q1.shape:
        raise ValueError(f"q2: shape {tuple(q2.shape)} must equal q1's {tuple(q1.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} must equal k's {tuple(k.shape)}")
    if b_k != b:
        raise ValueError(f"k: batch {b_k} differs from q1's batch {b}")
    if d_k != d:
        raise ValueError(f"k: head dim {d_k} differs from q1's head dim {d}")
    if min(b, h_q, l_q, d, h_kv, l_kv) < 1:
        raise ValueError(f"empty dimension: q1 {tuple(q1.shape)}, k {tuple(k.shape)}")
    if h_q % h_kv:
        raise ValueError(f"query heads H_Q={h_q} must be a multiple of KV heads H_KV={h_kv}")


def _position_tensor(cache_position, l_q: int) -> torch.Tensor:
    """`cache_position` as given (a tensor, or a list/tuple/range of ints made a CPU tensor) after the checks of its
    type, dtype and length; its values are not read here."""
    if isinstance(cache_position, (list, tuple, range)):
        items = list(cache_position)
        bad = [x for x in items if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise TypeError(f"cache_position: expected integer positions, got {bad[0]!r} "
                            f"({type(bad[0]).__name__}); nothing is truncated silently")
        cache_position = torch.tensor(items, dtype=torch.int64)
    _check_tensor("cache_position", cache_position, 1)
    if cache_position.dtype.is_floating_point or cache_position.dtype == torch.bool or cache_position.is_complex():
        raise TypeError(f"cache_position: expected an integer tensor, got {cache_position.dtype}")
    if cache_position.numel() != l_q:
        raise ValueError(f"cache_position: length {cache_position.numel()} must equal L_Q={l_q} (q1.shape[2])")
    return cache_position


def _check_position_range(lo: int, hi: int, l_kv: int) -> None:
    if lo < 0 or hi >= l_kv:
        raise ValueError(f"cache_position: values must lie in [0, L_KV={l_kv}); got min {lo}, max {hi}")


def _prepare(q1: torch.Tensor, k: torch.Tensor, cache_position, cfg, attention_mask, backend: str,
             q2: torch.Tensor | None = None, v: torch.Tensor | None = None) -> Prepared:
    """Every check of the public calls (`_check_inputs`, then the positions' range and the mask, which read values:
    a device synchronisation when they live on the GPU) and the `Prepared` inputs of the backends."""
    _check_inputs(q1, k, cfg, backend, q2, v)
    b, _, l_q, _ = q1.shape
    l_kv = k.shape[2]
    positions = _position_tensor(cache_position, l_q).to(device=q1.device, dtype=torch.int64)
    lo, hi = int(positions.min()), int(positions.max())
    _check_position_range(lo, hi, l_kv)

    if attention_mask is None:
        row_start = torch.zeros(b, dtype=torch.int64, device=q1.device)
    else:
        _check_tensor("attention_mask", attention_mask, 2)
        if tuple(attention_mask.shape) != (b, l_kv):
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)}, expected [B, L_KV] = {(b, l_kv)}")
        if attention_mask.dtype.is_floating_point or attention_mask.is_complex():
            raise TypeError(f"attention_mask: expected bool or integer, got {attention_mask.dtype}")
        mask = attention_mask.to(q1.device)
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("attention_mask: integer masks must hold only 0 and 1")
            mask = mask != 0
        seen = mask[:, : hi + 1]
        # Left padding: over keys 0..q_max each row reads 0…0 1…1; s = number of leading zeros.
        row_start = (~seen).to(torch.int64).cumprod(dim=1).sum(dim=1)
        expected = torch.arange(hi + 1, device=q1.device)[None, :] >= row_start[:, None]
        if not bool((seen == expected).all()):
            bad = int((seen != expected).any(dim=1).nonzero()[0])
            raise ValueError(f"attention_mask: row {bad} is not left-padded over keys 0..{hi} "
                             "(expected 0…0 1…1, one contiguous valid suffix)")
    return Prepared(positions, row_start, hi, l_kv)


def _check_routing(routing, cfg: SpanConfig, prep: Prepared, rows: tuple[int, int, int], device) -> SearchResult:
    """Validate a caller-given routing (see `superlinear_attention`); returns it with int32 bounds, fp32 values."""
    if not isinstance(routing, SearchResult):
        raise TypeError(f"routing: expected a SearchResult, got {type(routing).__name__}")
    shape = (*rows, cfg.num_spans)
    fields = {}
    for name in ("qstart", "qanchor", "qend", "values"):
        x = getattr(routing, name)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"routing.{name}: expected a tensor of shape [B, H_Q, L_Q, K] = {shape}, got {got}")
        if x.device != device:
            raise ValueError(f"routing.{name}: on {x.device} but q1 is on {device}")
        is_float = x.dtype.is_floating_point
        if (name == "values") != is_float or x.dtype == torch.bool:
            raise TypeError(f"routing.{name}: dtype {x.dtype}; expected "
                            f"{'a float' if name == 'values' else 'an integer'} tensor")
        fields[name] = x.float() if is_float else x.to(torch.int32)
    valid = fields["qanchor"] >= 0
    qs, qe = fields["qstart"].long(), fields["qend"].long()
    q = prep.cache_position[None, None, :, None]
    s = prep.row_start[:, None, None, None]
    if bool(((qs != -1) | (qe != -1))[~valid].any()):
        raise ValueError("routing: invalid slots (qanchor < 0) must have qstart = qend = -1")
    # Inclusive [qstart, qend] inside the row's keys before q, and (W > 0) before the window: the span
    # and window branches are merged as disjoint key sets (docs/algorithm.md §1.7, §3.3).
    end_cap = torch.minimum(q, prep.l_kv - 1 + torch.zeros_like(q))
    if cfg.window_len > 0:
        end_cap = torch.minimum(end_cap, _window_start(cfg, q) - 1)
    bad = valid & ((qs < s) | (qs < 0) | (qe > end_cap) | (fields["qanchor"].long() > q))
    if bool(bad.any()):
        b, h, i, slot = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"routing: slot {slot} of (batch {b}, head {h}, query position "
                         f"{int(prep.cache_position[i])}) spans [{int(qs[b, h, i, slot])}, {int(qe[b, h, i, slot])}]"
                         f" with anchor {int(fields['qanchor'][b, h, i, slot])}; expected row start <= qstart, "
                         f"qend <= min(q, sw_start(q) - 1) and anchor <= q")
    return SearchResult(fields["qstart"], fields["qanchor"], fields["qend"], fields["values"])


def _window_start(cfg: SpanConfig, q: torch.Tensor) -> torch.Tensor:
    from .geometry import window_bounds

    return window_bounds(cfg, q)[0]


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_available() else "torch"
    return backend


def _triton_available() -> bool:
    try:
        from .triton import available
    except ImportError:
        return False
    return available()


def _backend_module(name: str):
    if name == "oracle":
        from . import oracle

        return oracle
    if name == "torch":
        from . import torch_ops

        return torch_ops
    from . import triton as triton_backend

    if not triton_backend.available():
        raise ValueError("backend='triton': Triton is not importable here (or the tensors are on a device it cannot "
                         "run on); use backend='torch'")
    return triton_backend


def span_search(q1: torch.Tensor, k: torch.Tensor, cache_position, cfg: SpanConfig,
                attention_mask: torch.Tensor | None = None, backend: str = "auto") -> SearchResult:
    """Top-K stripe search (docs/algorithm.md §2): score anchors with raw <Q1, K>, keep the K best, derive spans.

    Args:
        q1: search queries [B, H_Q, L_Q, D] (fp16, bf16 or fp32).
        k: key cache [B, H_KV, L_KV, D], same dtype; H_Q must be a multiple of H_KV (GQA).
        cache_position: int tensor [L_Q], absolute position of each query, in [0, L_KV).
        cfg: the `SpanConfig`.
        attention_mask: None or bool/int [B, L_KV], left-padded (0…0 1…1 over keys 0..max position).
        backend: "auto", "oracle", "torch" or "triton".

    Returns:
        `SearchResult` with qstart/qanchor/qend (int32) and values (fp32), each [B, H_Q, L_Q, K].

    Example::

        r = span_search(torch.randn(1, 4, 64, 32), torch.randn(1, 2, 64, 32), torch.arange(64),
                        SpanConfig.default(), backend="torch")
    """
    prep = _prepare(q1, k, cache_position, cfg, attention_mask, backend)
    module = _backend_module(_resolve_backend(backend, q1))
    return module.span_search(q1, k, cfg, prep)


def superlinear_attention(q1: torch.Tensor, q2: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_position,
                          cfg: SpanConfig, attention_mask: torch.Tensor | None = None, backend: str = "auto",
                          return_routing: bool = False, routing: SearchResult | None = None):
    """Superlinear attention (docs/algorithm.md §2–3): search, K span ∪ window branches, LSE merge and gate.

    Args:
        q1: search/gate queries [B, H_Q, L_Q, D] (unscaled dot with K at the anchors).
        q2: attention queries [B, H_Q, L_Q, D] (scaled by 1/sqrt(D)).
        k, v: cache [B, H_KV, L_KV, D]; all four tensors share one dtype (fp16, bf16, fp32) and device.
        cache_position: int tensor [L_Q] in [0, L_KV). L_Q == 1 is decode; any chunk is chunked prefill.
        cfg: the `SpanConfig`.
        attention_mask: None or bool/int [B, L_KV], left-padded.
        backend: "auto", "oracle", "torch" or "triton".
        return_routing: also return the `SearchResult` (with `gate` [B, H_Q, L_Q, K]).
        routing: attend with this routing instead of searching (interventions, debugging): a `SearchResult`
            whose qstart/qanchor/qend/values are [B, H_Q, L_Q, K] with K = cfg.num_spans. A slot is valid iff
            qanchor >= 0; valid spans must lie in [s, q] and end before the window (qend < sw_start(q) when
            W > 0), invalid slots have qstart = qend = -1; the gate is softmax(values) as usual. Oracle and
            torch backends only.

    Returns:
        out [B, H_Q, L_Q, D] in q2's dtype, or (out, routing) when `return_routing`.

    One query (L_Q = 1) on the Triton backend without a mask, a routing, `return_routing` or gradients takes a
    path with no host synchronisation (a decoding loop's call): its checks read metadata only, per cache layout the
    step's set-up is kept, and from the second call with the same cache (same tensors, same layout) the step
    replays a captured CUDA graph. There a `cache_position` tensor on the GPU is not read on the host: a position
    outside [0, L_KV) makes every output row NaN instead of raising (a list or a CPU tensor is checked and raises
    as usual).

    Non-finite values: the inputs are not scanned (that would read the whole cache every decode step). A
    query whose window or chosen spans hold a key whose V row is not finite gets NaN output on every
    backend — never ±Inf, never a finite number: an output row with any non-finite component is returned
    as NaN in full. On the oracle
    and torch backends other queries are unaffected; the Triton kernels work on key tiles, so there a
    non-finite V row may also make other queries of its tile NaN. Keep caches finite.
    """
    if routing is None and attention_mask is None and not return_routing:
        out = _single_step(q1, q2, k, v, cache_position, cfg, backend)
        if out is not None:
            return out
    prep = _prepare(q1, k, cache_position, cfg, attention_mask, backend, q2=q2, v=v)
    name = _resolve_backend(backend, q1)
    module = _backend_module(name)
    if routing is None:
        out, routing = module.superlinear_attention(q1, q2, k, v, cfg, prep)
    else:
        if name == "triton":
            raise ValueError("routing=: a given routing is supported on backend='torch' or 'oracle', not 'triton'")
        routing = _check_routing(routing, cfg, prep, tuple(q1.shape[:3]), q1.device)
        out, routing = module.superlinear_attention(q1, q2, k, v, cfg, prep, routing=routing)
    if name != "triton":  # the Triton gate and decode merge kernels apply the rule themselves (no output copy)
        out = _nan_rows(out)
    return (out, routing) if return_routing else out


# The single-query Triton path of `superlinear_attention`: per cache layout, a `_DecodeRunner` (plan, buffers and, once
# the layout is seen again, a captured CUDA graph). Keyed by the tensors' addresses and layout, never holding them: a
# graph replays only for a call whose K/V sit at those addresses with that layout, i.e. the caller's live cache.
_RUNNERS: "OrderedDict[tuple, _DecodeRunner]" = OrderedDict()
_MAX_RUNNERS = 64  # least recently used layouts beyond this are dropped (with their graphs)
_RUNNERS_LOCK = threading.Lock()


def _single_step(q1, q2, k, v, cache_position, cfg, backend: str):
    """`superlinear_attention` for one query (L_Q = 1) on the Triton backend without a mask, routing or gradients,
    with no host synchronisation: the checks read metadata only (and a host-side position: a list, an int tensor on
    the CPU); a position tensor on the GPU is not read (a value outside [0, L_KV) gives NaN rows, see
    `superlinear_attention`). Returns None where this path does not apply (the general path then runs).

    The runner of a cache layout is keyed by every piece of metadata `_check_inputs` checks (shapes, strides,
    dtypes, devices, addresses, config, backend), so a call whose key is known passed those checks before and skips
    them. The step itself is `DecodeAttention`'s: a captured CUDA graph from the second call with one layout on."""
    shape = getattr(q1, "shape", None)
    if shape is None or len(shape) != 4 or shape[2] != 1:  # not one query (or not a tensor): the general path
        return None
    try:
        key = (q1.shape, q1.dtype, q1.device, q2.shape, q2.dtype, q2.device, k.shape, k.stride(), k.dtype, k.device,
               k.data_ptr(), v.shape, v.stride(), v.dtype, v.device, v.data_ptr(), cfg, backend)
        hash(key)
    except (AttributeError, TypeError):  # not tensors, an unhashable config: the general path names the error
        return None
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(key)
        if runner is not None:
            _RUNNERS.move_to_end(key)
    if runner is None:
        _check_inputs(q1, k, cfg, backend, q2, v)
        if _resolve_backend(backend, q1) != "triton" or k.stride(-1) != 1 or v.stride(-1) != 1:
            return None
    if torch.is_grad_enabled() and (q1.requires_grad or q2.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if type(cache_position) in (list, tuple) and len(cache_position) == 1 and type(cache_position[0]) is int:
        position = cache_position[0]  # the usual [position] (anything else gets `_position_tensor`'s checks)
        _check_position_range(position, position, k.shape[2])
    else:
        positions = _position_tensor(cache_position, 1)
        if positions.device.type == "cpu":
            position = int(positions[0])
            _check_position_range(position, position, k.shape[2])
        elif positions.device == q1.device:
            position = positions
        else:
            return None
    with _RUNNERS_LOCK:
        if runner is None:
            _backend_module("triton")  # Triton must run here (a clear error otherwise)
            runner = _RUNNERS.get(key) or _DecodeRunner(tuple(q1.shape), k, v, cfg, shared_pool=True)
            _RUNNERS[key] = runner
            if len(_RUNNERS) > _MAX_RUNNERS:
                _RUNNERS.popitem(last=False)
        runner.calls += 1
        if runner.calls >= 2 and runner.graph_capable and not torch.cuda.is_current_stream_capturing():
            return runner.replay(q1, q2, k, v, position)
        return runner.attend(q1, q2, k, v, position)


class _DecodeRunner:
    """The Triton one-query step for one cache layout: the plan (geometry tables, span bound), the position and
    row-start buffers, and on CUDA a captured graph of the step (`replay`: the queries and the position are copied
    into the graph's inputs, the output is a fresh tensor). K/V are passed to every call, not held."""

    def __init__(self, query_shape: tuple, k: torch.Tensor, v: torch.Tensor, cfg: SpanConfig,
                 shared_pool: bool = False):
        from .triton import ops

        probe = torch.empty(query_shape, dtype=k.dtype, device=k.device)
        self.plan = ops.decode_plan(probe, k, v, cfg)
        self._decode = ops.decode_attention
        self.cfg = cfg
        self.position = torch.zeros(1, dtype=torch.int64, device=k.device)
        self.row_start = torch.zeros(query_shape[0], dtype=torch.int64, device=k.device)
        self.graph_capable = k.is_cuda
        self.calls = 0
        self._shared_pool = shared_pool
        self._graph = None  # (graph, q1, q2, out) once captured

    def _set_position(self, position) -> torch.Tensor:
        """An int goes into the position buffer (a fill, no host read); a tensor is used as it is."""
        if isinstance(position, torch.Tensor):
            return position if position.dtype == torch.int64 else self.position.copy_(position)
        return self.position.fill_(position)

    def attend(self, q1, q2, k, v, position) -> torch.Tensor:
        """The step by direct launches (the decode merge kernel applies the non-finite rule itself)."""
        return self._decode(q1, q2, k, v, self.cfg, self._set_position(position), self.row_start, self.plan)

    def replay(self, q1, q2, k, v, position) -> torch.Tensor:
        """The step as a replay of the graph captured at the first such call (launches directly from then on if
        the capture fails: the reason is logged)."""
        if self._graph is None:
            static_q1, static_q2 = q1.clone(), q2.clone()
            if isinstance(position, torch.Tensor):
                self.position.copy_(position)
            else:
                self.position.fill_(position)
            self.attend(static_q1, static_q2, k, v, self.position)  # compiles outside the capture
            try:
                graph = torch.cuda.CUDAGraph()
                pool = _shared_graph_pool(k.device) if self._shared_pool else None
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    out = self.attend(static_q1, static_q2, k, v, self.position)
            except Exception as e:  # noqa: BLE001 - any capture failure: launch directly from now on
                logging.getLogger(__name__).warning("decode step: CUDA-graph capture failed (%s: %s); launching the "
                                                    "kernels directly", type(e).__name__, e)
                self.graph_capable = False
                return self.attend(q1, q2, k, v, position)
            self._graph = (graph, static_q1, static_q2, out)
        graph, static_q1, static_q2, out = self._graph
        # One call copies the inputs in (one launch per dtype); an int position is a fill.
        if not isinstance(position, torch.Tensor):
            torch._foreach_copy_([static_q1, static_q2], [q1, q2])
            self.position.fill_(position)
        elif position is self.position:
            torch._foreach_copy_([static_q1, static_q2], [q1, q2])
        else:
            torch._foreach_copy_([static_q1, static_q2, self.position], [q1, q2, position])
        if self._shared_pool:
            _order_after_last_replay(k.device)
        graph.replay()
        return out.clone()


_POOLS: dict = {}


def _shared_graph_pool(device):
    """One memory pool per device for the graphs of `superlinear_attention`'s single-query path: their scratch is
    shared (only one of them runs at a time, see `_order_after_last_replay`), so many cache layouts cost one step's
    scratch, not one each."""
    entry = _POOLS.get(device)
    if entry is None:
        entry = _POOLS[device] = [torch.cuda.graph_pool_handle(), None]
    return entry[0]


def _order_after_last_replay(device) -> None:
    """Graphs sharing a pool must not overlap: a replay on another stream than the last one waits for that stream."""
    entry = _POOLS[device]
    stream = torch.cuda.current_stream(device)
    if entry[1] is not None and entry[1] != stream:
        stream.wait_stream(entry[1])
    entry[1] = stream


def _nan_rows(out: torch.Tensor) -> torch.Tensor:
    """One rule for every backend: a query row [..., D] with any non-finite component is NaN in full."""
    return torch.where(torch.isfinite(out).all(dim=-1, keepdim=True), out, torch.full_like(out, float("nan")))


class DecodeAttention:
    """A pre-validated one-token `superlinear_attention` over one static K/V cache: what a decoding loop calls
    once per token (and what a CUDA graph captures).

    Everything `superlinear_attention` checks is checked once, here: the config, the backend, the cache tensors
    (shapes, dtype, device, GQA), the Triton backend's limits. A call then only compares the query tensors' shape,
    dtype and device on the host: it never reads a device value, so the per-token path has no host
    synchronisation. The result equals ``superlinear_attention(q1, q2, key_cache, value_cache, [position], cfg,
    backend=backend)`` bit for bit (same kernels, same arguments). Forward only (no autograd), no
    attention mask (every row starts at key 0), no routing.

    Args:
        key_cache, value_cache: [B, H_KV, L_KV, D] — the static cache. Calls read it as it is then, so K/V written
            between calls are seen; a reallocated cache needs a new entry.
        cfg: the `SpanConfig`.
        num_heads: H_Q, query heads of the calls (a multiple of H_KV).
        backend: "auto", "oracle", "torch" or "triton".
        graph: on the Triton backend with CUDA tensors (the default there), capture the step as a CUDA graph at
            the first call and replay it afterwards: the queries and the position are copied into the graph's
            inputs and the output is a fresh tensor, so a lone eager call costs about one graph replay instead of
            a dozen kernel launches from Python. A call made while the stream is being captured (a caller's own
            graph) launches the kernels directly; if the capture fails, the reason is logged and calls launch
            directly. False: always launch directly.

    Call ``entry(q1, q2, position)``:
        q1, q2: [B, H_Q, 1, D], the cache's dtype and device.
        position: the query's position — an int in [0, L_KV) (checked), or an int64 tensor [1] on the cache's
            device holding it. A tensor is not read on the Triton backend (the caller guarantees the range); this
            is what lets one captured graph serve every position. Other backends read it (they size their
            search on the host).
        Returns out [B, H_Q, 1, D] in the cache's dtype.

    Example::

        attend = DecodeAttention(k_cache, v_cache, SpanConfig.release(), num_heads=32)
        out = attend(q1, q2, 4096)                       # or attend(q1, q2, position_tensor)
    """

    def __init__(self, key_cache: torch.Tensor, value_cache: torch.Tensor, cfg: SpanConfig, num_heads: int,
                 backend: str = "auto", graph: bool = True):
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads={num_heads!r}: expected an int >= 1")
        _check_tensor("key_cache", key_cache, 4)
        b, _, l_kv, d = key_cache.shape
        probe = torch.zeros(b, num_heads, 1, d, dtype=key_cache.dtype, device=key_cache.device)
        self._prep = _prepare(probe, key_cache, [0], cfg, None, backend, q2=probe, v=value_cache)
        self.backend = _resolve_backend(backend, probe)
        self._module = _backend_module(self.backend)
        self.cfg = cfg
        self.key_cache, self.value_cache = key_cache, value_cache
        self.query_shape = tuple(probe.shape)
        self.l_kv = l_kv
        self._runner = _DecodeRunner(self.query_shape, key_cache, value_cache, cfg) if self.backend == "triton" \
            else None
        self._position = torch.zeros(1, dtype=torch.int64, device=key_cache.device)  # other backends' int position
        self._graph_capable = self._runner is not None and self._runner.graph_capable
        self._graph_wanted = bool(graph) and self._graph_capable

    @property
    def _graph(self):
        """The captured graph (with its static inputs and output), None before the first graph call."""
        return None if self._runner is None else self._runner._graph

    @property
    def use_graph(self) -> bool:
        """Whether calls replay the entry's own CUDA graph (see `graph`); settable (False: launch directly from now
        on; True: only where a graph is possible). A graph already captured is kept."""
        return self._graph_wanted

    @use_graph.setter
    def use_graph(self, on: bool) -> None:
        self._graph_wanted = bool(on) and self._graph_capable

    def __call__(self, q1: torch.Tensor, q2: torch.Tensor, position) -> torch.Tensor:
        for name, q in (("q1", q1), ("q2", q2)):
            if not isinstance(q, torch.Tensor) or tuple(q.shape) != self.query_shape \
                    or q.dtype != self.key_cache.dtype or q.device != self.key_cache.device:
                got = f"{q.dtype} {tuple(q.shape)} on {q.device}" if isinstance(q, torch.Tensor) else type(q).__name__
                raise ValueError(f"{name}: got {got}, expected {self.key_cache.dtype} {self.query_shape} "
                                 f"on {self.key_cache.device} (B, H_Q, 1, D of this decode entry)")
        if isinstance(position, torch.Tensor):
            if position.dtype != torch.int64 or tuple(position.shape) != (1,) or position.device != q1.device:
                raise ValueError(f"position: got {position.dtype} {tuple(position.shape)} on {position.device}, "
                                 f"expected an int64 tensor [1] on {q1.device}")
        elif not (isinstance(position, int) and not isinstance(position, bool) and 0 <= position < self.l_kv):
            raise ValueError(f"position={position!r}: expected an int in [0, L_KV={self.l_kv}) or an int64 tensor [1]")
        k, v = self.key_cache, self.value_cache
        if self._runner is None:
            return self._attend_other(q1, q2, position)
        if self._graph_wanted and not torch.cuda.is_current_stream_capturing():
            out = self._runner.replay(q1, q2, k, v, position)
            self._graph_wanted = self._graph_capable = self._runner.graph_capable  # off after a failed capture
            return out
        return self._runner.attend(q1, q2, k, v, position)

    def _attend_other(self, q1: torch.Tensor, q2: torch.Tensor, position) -> torch.Tensor:
        """The oracle and torch backends (they read the position on the host to size their search)."""
        positions = position if isinstance(position, torch.Tensor) else self._position.fill_(position)
        q_max = int(positions[0])
        if not 0 <= q_max < self.l_kv:
            raise ValueError(f"position: holds {q_max}, expected a value in [0, L_KV={self.l_kv})")
        prep = Prepared(positions, self._prep.row_start, q_max, self.l_kv)
        out, _ = self._module.superlinear_attention(q1, q2, self.key_cache, self.value_cache, self.cfg, prep)
        return _nan_rows(out)


@dataclass(frozen=True)
class StripeScores:
    """Search value of every stripe of every query — the full profile behind the top-K choice."""

    stripes: torch.Tensor  # int64 [S]: stripe indices σ+1 … M(max position + 1), nearest anchor first
    anchors: torch.Tensor  # int64 [L_Q, S]: anchor q + 1 - F(i) (may be < 0: then not a candidate)
    values: torch.Tensor  # fp32 [B, H_Q, L_Q, S]: <Q1, K(anchor)>, -inf where not a candidate


def stripe_scores(q1: torch.Tensor, k: torch.Tensor, cache_position, cfg: SpanConfig,
                  attention_mask: torch.Tensor | None = None) -> StripeScores:
    """Score every stripe (not only the top K) for views and debugging. Same inputs as `span_search`.

    Memory is O(B · H_Q · L_Q · S) with S ≈ (max position)^p: call it on a chosen subset of queries.
    The top-K of `values` per row, with ties to the earlier anchor, is exactly `span_search`'s choice.
    """
    prep = _prepare(q1, k, cache_position, cfg, attention_mask, "torch")
    from . import torch_ops

    stripes, anchors, values = torch_ops.stripe_scores(q1, k, cfg, prep)
    return StripeScores(stripes, anchors, values)
