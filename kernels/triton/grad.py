"""Backward of the Triton attention op (docs/algorithm.md §2.6, §3.6), called by `ops._AttentionFunction`.

With dg_k = dO·O_k (from the stored residuals R_k = O_k − O, see merge.py, or recomputed by `branch_dots`):
  * gate:   dv_k = g_k (dg_k − Σ_j g_j dg_j) on valid slots -> search backward (dQ1, dK at anchors);
  * spans:  branch k is plain attention over S_k ∪ Wnd with dO_k = g_k dO, Δ_k = g_k dg_k, lse ℓ_k;
            its span keys go through the span backward (span.py);
  * window: the K branches share the window keys; summed over k their gradient is one attention
            backward with lse_eff = −log Σ_k g_k e^{−ℓ_k} and Δ_eff = Σ_k w_k dg_k,
            w_k = g_k e^{−ℓ_k} / Σ_j g_j e^{−ℓ_j}, run once by window.py.

Order of the launches: the fused gate backward; dK/dV (fp32, key-major, no atomics): the window's stores, the
spans' add; then dQ2 per chunk of `common.TRAIN_CHUNK` queries — the window's stores into a fp32 chunk buffer,
the span tiles add (one atomic per pair row), the chunk goes to q2's dtype; last the search backward writes dQ1
and adds dK at the anchors. P is recomputed everywhere from the stored lse.
"""
from __future__ import annotations

import torch

from . import common
from .merge import gate_backward
from .search import search_backward
from .span import _blocks as span_blocks
from .span import sort_pairs, span_backward_dq, span_backward_kv
from .window import window_backward_dq, window_backward_kv


def _chunks(l_q: int, *xs):
    """(rows, chunks of xs): the query rows [B, H_Q, L_Q, ...] of each chunk of `common.TRAIN_CHUNK` queries, as
    contiguous copies (the tensors themselves when one chunk holds all)."""
    step = common.TRAIN_CHUNK
    for c0 in range(0, l_q, step):
        rows = slice(c0, c0 + step)
        yield rows, [x if l_q <= step else x[:, :, rows].contiguous() for x in xs]


def branch_dots(q2, k, v, qstart, qend, order, positions, row_start, window: int, do, branch_lse, win_lse):
    """dO·O_k per pair, fp32 [B, H_Q, L_Q, K], recomputed instead of stored (`common.KEEP_RESIDUALS` = False).

    O_k attends Wnd ∪ S_k with P_kj = exp(s_j − ℓ_k), so dO·O_k = e^{ℓ_w − ℓ_k} Σ_{j ∈ Wnd} e^{s_j − ℓ_w} dO·V_j
    + Σ_{j ∈ S_k} e^{s_j − ℓ_k} dO·V_j: one window pass per row (ℓ_w = the window's lse, win_lse fp32
    [B, H_Q, L_Q]) and one pass over the pair tiles, per chunk of `common.TRAIN_CHUNK` queries. Both terms are 0
    where their keys are empty (ℓ = −inf)."""
    l_q = q2.shape[2]
    dots = torch.empty(qstart.shape, dtype=torch.float32, device=q2.device)
    for rows, (q2_c, do_c, wl_c, qs_c, qe_c, bl_c) in _chunks(l_q, q2, do, win_lse, qstart, qend, branch_lse):
        win = torch.empty(wl_c.shape, dtype=torch.float32, device=q2.device)
        window_backward_dq(q2_c, k, v, positions[rows], row_start, window, do_c, wl_c, wl_c, win, dots=True)
        part = torch.empty(qs_c.shape, dtype=torch.float32, device=q2.device)
        span_backward_dq(q2_c, k, v, qs_c, qe_c, order if l_q <= common.TRAIN_CHUNK else None, do_c, bl_c, bl_c,
                         bl_c, part, dots=True)
        both = (wl_c[..., None] > float("-inf")) & (bl_c > float("-inf"))
        weight = torch.where(both, torch.exp(wl_c[..., None] - bl_c), torch.zeros_like(bl_c))
        dots[:, :, rows] = part + weight * win[..., None]
    return dots


def pair_order(q2, k, qstart, qend, order):
    """The pair sort of the whole call (`span.sort_pairs`): the forward's `order` when it sorted the whole call at
    once, else sorted here, once for the backward's span kernels."""
    if order is not None:
        return order
    return sort_pairs(qstart, qend, k.shape[1], span_blocks(q2.shape[-1])[1], k.shape[2])


def gate_grads(q2, k, v, qstart, qanchor, qend, gate, out, residuals, branch_lse, win_lse, order, positions,
               row_start, window: int, do, dvalues_out, dgate_out):
    """The fused gate backward (merge.gate_backward): (dvalues, delta, lse_eff, delta_eff), from the residuals
    R_k = O_k − O [B, H_Q, L_Q, K, D] or, with residuals None, from dO·O_k recomputed by `branch_dots` (needs
    win_lse). The only step that reads the residuals: the caller can free them afterwards. Arguments as
    `attention_backward`; do [B, H_Q, L_Q, D] in q2's dtype; order: the whole call's pair sort (`pair_order`)."""
    dots = None if residuals is not None else branch_dots(q2, k, v, qstart, qend, order, positions, row_start,
                                                          window, do, branch_lse, win_lse)
    return gate_backward(do, out, residuals, gate, qanchor, branch_lse, dgate_out, dvalues_out, dots)


def attention_backward(q1, q2, k, v, qstart, qanchor, qend, gate, branch_lse, order, positions, row_start,
                       window: int, do, grads):
    """Gradients (dq1, dq2, dk, dv) in the inputs' dtypes, after `gate_grads`.

    q1, q2 [B, H_Q, L_Q, D] contiguous; k, v [B, H_KV, L_KV, D] (unit stride in D); routing int32 and gate fp32
    [B, H_Q, L_Q, K]; branch_lse fp32 [B, H_Q, L_Q, K]; order: the whole call's pair sort (`pair_order`); positions
    int64 [L_Q]; row_start int64 [B]; do [B, H_Q, L_Q, D] in q2's dtype (contiguous); grads: `gate_grads`' result.
    """
    dvalues, delta, lse_eff, delta_eff = grads
    dk = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.empty_like(dk)
    window_backward_kv(q2, k, v, positions, row_start, window, do, lse_eff, delta_eff, dk, dv)
    span_backward_kv(q2, k, v, qstart, qend, order, do, gate, branch_lse, delta, dk, dv)

    l_q = q2.shape[2]
    dq2 = torch.empty_like(q2)
    for rows, (q2_c, do_c, lse_c, delta_eff_c, qstart_c, qend_c, gate_c, blse_c, delta_c) in _chunks(
            l_q, q2, do, lse_eff, delta_eff, qstart, qend, gate, branch_lse, delta):
        acc = torch.empty(q2_c.shape, dtype=torch.float32, device=q2.device)
        window_backward_dq(q2_c, k, v, positions[rows], row_start, window, do_c, lse_c, delta_eff_c, acc)
        span_backward_dq(q2_c, k, v, qstart_c, qend_c, order if l_q <= common.TRAIN_CHUNK else None, do_c, gate_c,
                         blse_c, delta_c, acc)
        dq2[:, :, rows] = acc
        del acc, q2_c, do_c, lse_c, delta_eff_c, qstart_c, qend_c, gate_c, blse_c, delta_c
    del lse_eff, delta_eff, delta
    dq1 = search_backward(q1, k, qanchor, dvalues, dk)
    return dq1, dq2, dk.to(k.dtype), dv.to(v.dtype)
