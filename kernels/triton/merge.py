"""Gate and mix (docs/algorithm.md §3.2): g = softmax_k(ṽ_k) with ṽ_k = v_k on valid slots and -1e9 on invalid
ones, then O = Σ_k g_k O_k in Q2's dtype. The branch outputs O_k already hold the window merge
(span.py), so this is one pass over [rows x K x D], tiles of BLOCK_R rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..softmax import INVALID_GATE_LOGIT
from .common import block_d


@triton.jit
def _gate_kernel(values_ptr, anchor_ptr, bout_ptr, out_ptr, gate_ptr, N_ROWS, D, INVALID,
                 NUM_SPANS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
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
    tl.store(out_ptr + rows[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)


def gate_forward(values: torch.Tensor, qanchor: torch.Tensor, branch_out: torch.Tensor, out_dtype: torch.dtype):
    """values fp32 / qanchor int32 [B, H_Q, L_Q, K]; branch_out fp32 [B, H_Q, L_Q, K, D].

    Returns out [B, H_Q, L_Q, D] in `out_dtype` and gate fp32 [B, H_Q, L_Q, K].
    """
    b, h_q, l_q, num_spans, d = branch_out.shape
    out = torch.empty(b, h_q, l_q, d, dtype=out_dtype, device=values.device)
    gate = torch.empty_like(values)
    n_rows = b * h_q * l_q
    block_r = 32
    _gate_kernel[(triton.cdiv(n_rows, block_r),)](
        values, qanchor, branch_out, out, gate, n_rows, d, INVALID_GATE_LOGIT,
        NUM_SPANS=num_spans, BLOCK_R=block_r, BLOCK_D=block_d(d), num_warps=4)
    return out, gate
