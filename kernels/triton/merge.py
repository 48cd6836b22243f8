"""Gate and mix (docs/algorithm.md §3.2): g = softmax_k(ṽ_k) with ṽ_k = v_k on valid slots and -1e9 on invalid
ones, then O = Σ_k g_k O_k in Q2's dtype. The branch outputs O_k already hold the window merge
(span.py), so this is one pass over [rows x K x D], tiles of BLOCK_R rows.

For training the forward also writes R_k = O_k − O in Q2's dtype (half the bytes of fp32 O_k in bf16), and the
backward needs no more of the branches: dg_k = dO·O_k = dO·R_k + dO·O, and the gate gradient
g_k (dg_k − Σ_j g_j dg_j) = g_k (dO·R_k − Σ_j g_j dO·R_j) has no cancellation between near-equal branches
(the branches share the window, so their O_k are often close).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..softmax import INVALID_GATE_LOGIT
from .common import block_d, next_pow2
from .rules import nonfinite_rows


@triton.jit
def _gate_kernel(values_ptr, anchor_ptr, bout_ptr, out_ptr, gate_ptr, res_ptr, N_ROWS, D, INVALID,
                 NUM_SPANS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, RESIDUALS: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ok = rows < N_ROWS
    d = tl.arange(0, BLOCK_D)
    m2 = ok[:, None] & (d < D)[None, :]
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for slot in tl.static_range(NUM_SPANS):
        val = tl.load(values_ptr + rows * NUM_SPANS + slot, mask=ok, other=0.0)
        anchor = tl.load(anchor_ptr + rows * NUM_SPANS + slot, mask=ok, other=-1)
        top = tl.maximum(top, tl.where(anchor >= 0, val, INVALID))
    total = tl.zeros([BLOCK_R], tl.float32)
    for slot in tl.static_range(NUM_SPANS):
        val = tl.load(values_ptr + rows * NUM_SPANS + slot, mask=ok, other=0.0)
        anchor = tl.load(anchor_ptr + rows * NUM_SPANS + slot, mask=ok, other=-1)
        total += tl.exp(tl.where(anchor >= 0, val, INVALID) - top)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for slot in tl.static_range(NUM_SPANS):
        val = tl.load(values_ptr + rows * NUM_SPANS + slot, mask=ok, other=0.0)
        anchor = tl.load(anchor_ptr + rows * NUM_SPANS + slot, mask=ok, other=-1)
        g = tl.exp(tl.where(anchor >= 0, val, INVALID) - top) / total
        tl.store(gate_ptr + rows * NUM_SPANS + slot, g, mask=ok)
        o = tl.load(bout_ptr + (rows * NUM_SPANS + slot)[:, None] * D + d[None, :], mask=m2, other=0.0)
        acc += g[:, None] * o
    out = acc.to(out_ptr.dtype.element_ty)
    # The API's non-finite rule, applied here so that the layer's output is not copied.
    o32 = out.to(tl.float32)
    out = tl.where(nonfinite_rows(o32, m2, 1)[:, None], float("nan"), o32).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * D + d[None, :], out, mask=m2)
    if RESIDUALS:  # R_k = O_k - O (O as stored), what the backward needs of the branches (module docstring)
        out32 = out.to(tl.float32)
        for slot in tl.static_range(NUM_SPANS):
            off = (rows * NUM_SPANS + slot)[:, None] * D + d[None, :]
            o = tl.load(bout_ptr + off, mask=m2, other=0.0)
            tl.store(res_ptr + off, (o - out32).to(res_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gate_bwd_kernel(do_ptr, out_ptr, res_ptr, gate_ptr, anchor_ptr, blse_ptr, dgate_ptr, dvalues_ptr,
                     delta_ptr, lse_eff_ptr, delta_eff_ptr, N_ROWS, D,
                     NUM_SPANS: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOTS: tl.constexpr):
    """Per row: t_k = dO·R_k and c = dO·O, so dg_k = dO·O_k = t_k + c; then the gate gradient, the span
    branches' Δ_k = g_k dg_k and the window's folded lse_eff, Δ_eff (docs/algorithm.md §2.6, §3.6; ops.py).
    DOTS: res_ptr holds dg_k = dO·O_k itself (fp32 [rows, K], grad.branch_dots): t_k = dg_k, c = 0."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ok = rows < N_ROWS
    d = tl.arange(0, BLOCK_D)
    m2 = ok[:, None] & (d < D)[None, :]
    slot = tl.arange(0, KP)
    ks = ok[:, None] & (slot < NUM_SPANS)[None, :]
    kidx = rows[:, None] * NUM_SPANS + slot[None, :]
    if DOTS:
        t = tl.load(res_ptr + kidx, mask=ks, other=0.0)
        c = tl.zeros([BLOCK_R], tl.float32)
    else:
        do = tl.load(do_ptr + rows[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        c = tl.sum(do * tl.load(out_ptr + rows[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32), axis=1)
        t = tl.zeros([BLOCK_R, KP], tl.float32)
        for k in tl.static_range(NUM_SPANS):
            r = tl.load(res_ptr + (rows * NUM_SPANS + k)[:, None] * D + d[None, :], mask=m2, other=0.0)
            t = tl.where(slot[None, :] == k, tl.sum(do * r.to(tl.float32), axis=1)[:, None], t)
    g = tl.load(gate_ptr + kidx, mask=ks, other=0.0)
    anchor = tl.load(anchor_ptr + kidx, mask=ks, other=-1)
    lse = tl.load(blse_ptr + kidx, mask=ks, other=float("-inf"))
    dgo = tl.load(dgate_ptr + kidx, mask=ks, other=0.0)
    dvo = tl.load(dvalues_ptr + kidx, mask=ks, other=0.0)
    dg = t + c[:, None]
    # g_k (dg_k + dgo_k - Σ_j g_j (dg_j + dgo_j)) with Σ_j g_j = 1: c cancels exactly, so it is left out.
    dvalues = g * (t - tl.sum(g * t, axis=1)[:, None] + dgo - tl.sum(g * dgo, axis=1)[:, None]) + dvo
    tl.store(dvalues_ptr + kidx, tl.where(anchor >= 0, dvalues, 0.0), mask=ks)
    tl.store(delta_ptr + kidx, g * dg, mask=ks)
    # Window keys: w_k = g_k e^{-l_k} / Σ_j g_j e^{-l_j} over branches with keys; lse_eff = -log Σ_j g_j e^{-l_j}.
    usable = ks & (lse > float("-inf")) & (lse < float("inf")) & (g > 0)
    log_w = tl.where(usable, tl.log(tl.where(usable, g, 1.0)) - tl.where(usable, lse, 0.0), float("-inf"))
    top = tl.max(log_w, axis=1)
    any_usable = top > float("-inf")
    top_use = tl.where(any_usable, top, 0.0)
    e = tl.where(usable, tl.exp(log_w - top_use[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    w = e / tl.where(any_usable, total, 1.0)[:, None]
    lse_eff = tl.where(any_usable, -(top_use + tl.log(tl.where(any_usable, total, 1.0))), float("inf"))
    tl.store(lse_eff_ptr + rows, lse_eff, mask=ok)
    tl.store(delta_eff_ptr + rows, tl.sum(w * dg, axis=1), mask=ok)


def gate_forward(values: torch.Tensor, qanchor: torch.Tensor, branch_out: torch.Tensor, out_dtype: torch.dtype,
                 residuals: bool = False, into: tuple | None = None):
    """values fp32 / qanchor int32 [B, H_Q, L_Q, K]; branch_out fp32 [B, H_Q, L_Q, K, D].

    Returns out [B, H_Q, L_Q, D] in `out_dtype`, gate fp32 [B, H_Q, L_Q, K] and, with `residuals`, R_k = O_k − O
    [B, H_Q, L_Q, K, D] in `out_dtype` (else None): what the backward keeps of the branches. `into`: (out, gate,
    residuals or None), contiguous tensors of those shapes to write instead of new ones.
    """
    b, h_q, l_q, num_spans, d = branch_out.shape
    if into is not None:
        out, gate, res = into
    else:
        out = torch.empty(b, h_q, l_q, d, dtype=out_dtype, device=values.device)
        gate = torch.empty_like(values)
        res = torch.empty(branch_out.shape, dtype=out_dtype, device=values.device) if residuals else None
    n_rows = b * h_q * l_q
    block_r = 32
    _gate_kernel[(triton.cdiv(n_rows, block_r),)](
        values, qanchor, branch_out, out, gate, out if res is None else res, n_rows, d, INVALID_GATE_LOGIT,
        NUM_SPANS=num_spans, BLOCK_R=block_r, BLOCK_D=block_d(d), RESIDUALS=residuals, num_warps=4)
    return out, gate, res


def gate_backward(do, out, residuals, gate, qanchor, branch_lse, dgate_out, dvalues_out, dots=None):
    """Gate, Δ and window-fold gradients of one call (docs/algorithm.md §2.6, §3.6), fused per row.

    do, out [B, H_Q, L_Q, D] (out's dtype); residuals R_k = O_k − O [B, H_Q, L_Q, K, D], or None with `dots`
    = dO·O_k fp32 [B, H_Q, L_Q, K] given instead; gate, branch_lse, dgate_out, dvalues_out fp32 / qanchor int32
    [B, H_Q, L_Q, K]. Returns (dvalues, delta) fp32 [.., K] — the values' gradient (0 on invalid slots) and
    Δ_k = g_k dO·O_k — and (lse_eff, delta_eff) fp32 [B, H_Q, L_Q] (+inf where no branch has keys).
    """
    b, h_q, l_q, num_spans = gate.shape
    d = do.shape[-1]
    dvalues = dvalues_out.float().contiguous().clone()
    delta = torch.empty_like(gate)
    lse_eff = torch.empty(b, h_q, l_q, dtype=torch.float32, device=gate.device)
    delta_eff = torch.empty_like(lse_eff)
    n_rows = b * h_q * l_q
    block_r = 16
    _gate_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
        do, out, dots if residuals is None else residuals, gate, qanchor, branch_lse, dgate_out.float().contiguous(),
        dvalues, delta, lse_eff, delta_eff, n_rows, d,
        NUM_SPANS=num_spans, KP=next_pow2(num_spans), BLOCK_R=block_r, BLOCK_D=block_d(d), DOTS=residuals is None,
        num_warps=4)
    return dvalues, delta, lse_eff, delta_eff
