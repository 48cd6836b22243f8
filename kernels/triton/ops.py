"""The Triton backend's entry points (called by `superlinear_kernels.api` after validation) and the
autograd Functions that make them trainable.

Forward pipeline of `superlinear_attention` (docs/algorithm.md §3.5, "precomputed window" fused with bucketing):
  1. search.py   — top-K anchors, spans and raw values;
  2. window.py   — window branch out/lse (W > 0);
  3. span.py     — each (q, k) pair continues the window's softmax over its span: O_k, ℓ_k of S_k ∪ Wnd
                   in sorted pair tiles;
  4. merge.py    — gate g = softmax(ṽ) and O = Σ g_k O_k.
For decode (L_Q = 1), decode.py does steps 2-4: one pass per KV group over the keys its branches need.
Nothing here reads a tensor value on the host: grids come from shapes, loop bounds from device
tensors, so the path has no host synchronisation.

Backward: grad.py (recomputation from stored lse; dK/dV key-major without atomics).
"""
from __future__ import annotations

import torch

from ..api import Prepared, SearchResult
from ..config import SpanConfig
from ..geometry import span_lengths
from . import common
from .common import INTERPRET, MAX_HEAD_DIM, MAX_SPANS, geometry_tables
from .decode import decode_forward, decode_pdl
from .grad import attention_backward, gate_grads, pair_order
from .merge import gate_forward
from .search import search_backward, search_forward
from .span import span_forward
from .window import window_forward


def check_supported(q1: torch.Tensor, k: torch.Tensor, cfg: SpanConfig) -> None:
    """Kernel-specific limits, raised before any launch (the generic checks ran in api._prepare)."""
    if cfg.num_spans > MAX_SPANS:
        raise ValueError(f"cfg.num_spans={cfg.num_spans}: the Triton backend supports K in 1..{MAX_SPANS} "
                         "(docs/algorithm.md §1.2); use backend='torch' or 'oracle' for larger K")
    d = q1.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q1: head dim D={d} is larger than the Triton backend's limit {MAX_HEAD_DIM} "
                         "(docs/algorithm.md §1.2); use backend='torch'")
    if not INTERPRET and not q1.is_cuda:
        raise ValueError(f"q1: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                         f"interpreter); got device {q1.device}")
    if k.shape[2] >= 2**31 - 1:
        raise ValueError(f"k: L_KV={k.shape[2]} does not fit the int32 span indices (< 2^31 - 1)")


def _kv(x: torch.Tensor) -> torch.Tensor:
    """K/V may be a strided view of a larger cache; the kernels need unit stride over D only."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _max_span_len(cfg: SpanConfig, l_kv: int) -> int:
    """B(L_KV) + Fw(L_KV) + 1 >= every span length of the call, read from the host copy of the
    shared tables (no device sync); it only sizes the decode merge's chunk vectors."""
    backward, forward = span_lengths(cfg, l_kv, device="cpu")
    return int(backward[l_kv]) + int(forward[l_kv]) + 1


def _search(q1, k, cfg: SpanConfig, prep: Prepared):
    return _search_at(q1, k, cfg, prep.cache_position, prep.row_start, geometry_tables(cfg, k.shape[2], q1.device))


def _search_at(q1, k, cfg: SpanConfig, positions: torch.Tensor, row_start: torch.Tensor, tables, pdl: bool = False):
    return search_forward(q1, k, positions, row_start, tables, cfg.sw_index, cfg.window_len, cfg.num_spans, pdl=pdl)


def _decode(q1, q2, k, v, cfg: SpanConfig, positions, row_start, tables, max_span_len: int):
    """One decode step (L_Q = 1): search, then one pass per KV group over the union of its branches' keys.
    Returns (qstart, qanchor, qend, values) and (out, gate, branch_out, branch_lse) (see `decode_forward`)."""
    routing = _search_at(q1, k, cfg, positions, row_start, tables, pdl=decode_pdl(q1.device))
    qstart, qanchor, qend, values = routing
    return routing, decode_forward(q2, k, v, qstart, qend, qanchor, values, positions, row_start, cfg.window_len,
                                   max_span_len)


class DecodePlan:
    """What a pre-validated decode entry (`superlinear_kernels.api.DecodeAttention`) fixes once per cache: the
    geometry tables (device tensors sized by L_KV) and the merge's span bound, so a step does no table lookup."""

    def __init__(self, cfg: SpanConfig, k: torch.Tensor):
        self.tables = geometry_tables(cfg, k.shape[2], k.device)
        self.max_span_len = _max_span_len(cfg, k.shape[2])


def decode_plan(q1: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SpanConfig) -> DecodePlan:
    """Check the kernel limits for decode queries like `q1` [B, H_Q, 1, D] over k, v [B, H_KV, L_KV, D]; the plan."""
    check_supported(q1, k, cfg)
    for name, x in (("key_cache", k), ("value_cache", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: strides {x.stride()}; the decode entry needs unit stride over D")
    return DecodePlan(cfg, k)


def decode_attention(q1, q2, k, v, cfg: SpanConfig, positions: torch.Tensor, row_start: torch.Tensor,
                     plan: DecodePlan) -> torch.Tensor:
    """Forward-only decode step for a caller that validated everything once (`api.DecodeAttention`).

    q1, q2 [B, H_Q, 1, D]; k, v [B, H_KV, L_KV, D] with unit stride over D; positions int64 [1] and row_start
    int64 [B] on the device (never read on the host). Returns out [B, H_Q, 1, D] in q2's dtype — the same
    launches with the same arguments as `superlinear_attention` for L_Q = 1, so the same bits.
    """
    _, (out, _, _, _) = _decode(q1.contiguous(), q2.contiguous(), k, v, cfg, positions, row_start, plan.tables,
                                plan.max_span_len)
    return out


class _SearchFunction(torch.autograd.Function):
    """Span search; differentiable through `values` only (docs/algorithm.md §2.6)."""

    @staticmethod
    def forward(ctx, q1, k, cfg, prep):
        qstart, qanchor, qend, values = _search(q1, k, cfg, prep)
        ctx.save_for_backward(q1, k, qanchor)
        ctx.mark_non_differentiable(qstart, qanchor, qend)
        return qstart, qanchor, qend, values

    @staticmethod
    def backward(ctx, _gs, _ga, _ge, dvalues):
        q1, k, qanchor = ctx.saved_tensors
        dvalues = torch.where(qanchor >= 0, dvalues, torch.zeros_like(dvalues)).float()
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dq1 = search_backward(q1, k, qanchor, dvalues, dk)
        return dq1.to(q1.dtype), dk.to(k.dtype), None, None


def span_search(q1: torch.Tensor, k: torch.Tensor, cfg: SpanConfig, prep: Prepared) -> SearchResult:
    """Top-K search on the GPU (docs/algorithm.md §2). q1 [B, H_Q, L_Q, D], k [B, H_KV, L_KV, D] -> `SearchResult`."""
    check_supported(q1, k, cfg)
    qstart, qanchor, qend, values = _SearchFunction.apply(q1.contiguous(), _kv(k), cfg, prep)
    return SearchResult(qstart, qanchor, qend, values)


def _branches(q2, k, v, qstart, qanchor, qend, values, positions, row_start, window: int, residuals: bool,
              into: tuple | None = None):
    """Window, spans and gate of one block of queries: (out, gate, residuals or None, branch_lse, order, win_lse).
    `into`: (out, gate, residuals or None) to write the gate's outputs into (`merge.gate_forward`)."""
    win_out, win_lse = window_forward(q2, k, v, positions, row_start, window)
    branch_out, branch_lse, order = span_forward(q2, k, v, qstart, qend, win_out, win_lse)
    del win_out
    out, gate, res = gate_forward(values, qanchor, branch_out, q2.dtype, residuals=residuals, into=into)
    return out, gate, res, branch_lse, order, win_lse


def _whole_call_outputs(q2, qstart, residuals: bool):
    """Empty whole-call tensors that chunked forwards write into: (out, gate, residuals or None, branch_lse,
    win_lse), shaped as `_branches` returns them for all of q2 [B, H_Q, L_Q, D]."""
    b, h_q, l_q, d = q2.shape
    gate = torch.empty(qstart.shape, dtype=torch.float32, device=q2.device)
    res = torch.empty(*qstart.shape, d, dtype=q2.dtype, device=q2.device) if residuals else None
    return (torch.empty_like(q2), gate, res, torch.empty_like(gate),
            torch.empty(b, h_q, l_q, dtype=torch.float32, device=q2.device))


def _branches_in_chunks(q2, k, v, qstart, qanchor, qend, values, prep: Prepared, window: int, residuals: bool,
                        size: int):
    """`_branches` over chunks of `size` queries, written into whole-call tensors: the fp32 window and branch
    outputs exist for one chunk at a time; only R_k = O_k - O (q2's dtype; with `residuals`) and the window's
    lse are kept for the backward. Returns (out, gate, residuals or None, branch_lse, win_lse)."""
    out, gate, res, branch_lse, win_lse = _whole_call_outputs(q2, qstart, residuals)
    for c0 in range(0, q2.shape[2], size):
        rows = slice(c0, c0 + size)
        part = _branches(q2[:, :, rows].contiguous(), k, v, qstart[:, :, rows].contiguous(),
                         qanchor[:, :, rows].contiguous(), qend[:, :, rows].contiguous(),
                         values[:, :, rows].contiguous(), prep.cache_position[rows], prep.row_start, window,
                         residuals)
        for whole, chunk in zip((out, gate, res, branch_lse, None, win_lse), part):
            if whole is not None:
                whole[:, :, rows] = chunk
        del part
    return out, gate, res, branch_lse, win_lse


def _branches_by_heads(q2, k, v, qstart, qanchor, qend, values, prep: Prepared, window: int, residuals: bool,
                       heads: int):
    """`_branches` over chunks of `heads` query heads of one KV group and one batch row (all queries), written in
    place into whole-call tensors (a chunk is a contiguous slice of each: nothing is copied in or out except the two
    lse). Returns what `_branches_in_chunks` returns."""
    b, h_q = q2.shape[:2]
    group = h_q // k.shape[1]
    out, gate, res, branch_lse, win_lse = _whole_call_outputs(q2, qstart, residuals)
    values = values.contiguous()
    for row in range(b):
        r = slice(row, row + 1)
        for h0 in range(0, h_q, heads):
            hs, kv = slice(h0, h0 + heads), slice(h0 // group, h0 // group + 1)
            _, _, _, branch_lse[r, hs], _, win_lse[r, hs] = _branches(
                q2[r, hs], k[r, kv], v[r, kv], qstart[r, hs], qanchor[r, hs], qend[r, hs], values[r, hs],
                prep.cache_position, prep.row_start[r], window, residuals,
                into=(out[r, hs], gate[r, hs], None if res is None else res[r, hs]))
    return out, gate, res, branch_lse, win_lse


class _AttentionFunction(torch.autograd.Function):
    """Search + window + spans + gate; gradients for q1 (through the gate), q2, k and v."""

    @staticmethod
    def forward(ctx, q1, q2, k, v, cfg, prep):
        window = cfg.window_len
        need_grad = any(ctx.needs_input_grad[:4])
        keep = need_grad and common.KEEP_RESIDUALS
        chunk = common.train_forward_chunk(q2.shape[2], q2.shape[0] * q2.shape[1])
        win_lse = None
        if q2.shape[2] == 1:  # decode: one pass per KV group over the union of its branches' keys
            (qstart, qanchor, qend, values), (out, gate, branch_out, branch_lse) = _decode(
                q1, q2, k, v, cfg, prep.cache_position, prep.row_start, geometry_tables(cfg, k.shape[2], q1.device),
                _max_span_len(cfg, k.shape[2]))
            residuals = (branch_out - out.float().unsqueeze(-2)).to(q2.dtype) if need_grad else None
            order = None
        elif need_grad and q2.shape[2] > chunk:
            qstart, qanchor, qend, values = _search(q1, k, cfg, prep)
            heads = common.train_forward_heads(q2.shape[2], q2.shape[0] * q2.shape[1], q2.shape[1] // k.shape[1])
            if common.TRAIN_FWD_BY_HEADS and heads:
                out, gate, residuals, branch_lse, win_lse = _branches_by_heads(q2, k, v, qstart, qanchor, qend, values,
                                                                               prep, window, keep, heads)
            else:
                out, gate, residuals, branch_lse, win_lse = _branches_in_chunks(q2, k, v, qstart, qanchor, qend,
                                                                                values, prep, window, keep, chunk)
            order = None  # the backward sorts the whole call's pairs again
        else:
            qstart, qanchor, qend, values = _search(q1, k, cfg, prep)
            out, gate, residuals, branch_lse, order, win_lse = _branches(q2, k, v, qstart, qanchor, qend, values,
                                                                         prep.cache_position, prep.row_start, window,
                                                                         keep)
        if not need_grad:
            win_lse = None  # only the recomputing backward (grad.branch_dots) reads it
        ctx.save_for_backward(q1, q2, k, v, qstart, qanchor, qend, gate, out, branch_lse, win_lse)
        # Not a saved tensor: the first backward drops it once the gate backward has read it (`backward`). So
        # saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks: offloading, packing) do not see it.
        ctx.residuals = residuals
        ctx.order = order
        ctx.window = window
        ctx.prep = prep
        ctx.mark_non_differentiable(qstart, qanchor, qend)
        return out, qstart, qanchor, qend, values, gate

    @staticmethod
    def backward(ctx, dout, _dqstart, _dqanchor, _dqend, dvalues_out, dgate_out):
        # The returned values and gate are differentiable too (same as the other backends): a loss on them
        # adds to the gate's gradient and to the values' gradient before the search backward (grad.py).
        # The residuals R_k (K × q2's size) are needed only by the gate backward: the first backward frees them
        # right after it (when the window's lse is kept, so that a second backward through the graph, with
        # retain_graph=True, can recompute dO·O_k from it instead; the decode path keeps them).
        q1, q2, k, v, qstart, qanchor, qend, gate, out, branch_lse, win_lse = ctx.saved_tensors
        residuals = ctx.residuals
        if win_lse is not None:
            ctx.residuals = None
        positions, row_start = ctx.prep.cache_position, ctx.prep.row_start
        do = dout.to(q2.dtype).contiguous()
        order = pair_order(q2, k, qstart, qend, ctx.order)
        grads = gate_grads(q2, k, v, qstart, qanchor, qend, gate, out, residuals, branch_lse, win_lse, order,
                           positions, row_start, ctx.window, do, dvalues_out, dgate_out)
        del residuals
        dq1, dq2, dk, dv = attention_backward(q1, q2, k, v, qstart, qanchor, qend, gate, branch_lse, order, positions,
                                              row_start, ctx.window, do, grads)
        return dq1, dq2, dk, dv, None, None


def superlinear_attention(q1, q2, k, v, cfg: SpanConfig, prep: Prepared):
    """Superlinear attention on the GPU (docs/algorithm.md §2–3).

    q1, q2 [B, H_Q, L_Q, D]; k, v [B, H_KV, L_KV, D]; returns (out [B, H_Q, L_Q, D] in q2's dtype,
    `SearchResult` with gate). `values` and `gate` are differentiable (to q1 and k through the search), as on
    the other backends; the span bounds are integers.
    """
    check_supported(q1, k, cfg)
    out, qstart, qanchor, qend, values, gate = _AttentionFunction.apply(
        q1.contiguous(), q2.contiguous(), _kv(k), _kv(v), cfg, prep)
    return out, SearchResult(qstart, qanchor, qend, values, gate)
