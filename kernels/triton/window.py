"""Sliding-window branch (docs/algorithm.md §3.4): attention of each query over Wnd(q) = [max(q-W+1, s), q].

Forward: flash-style. One program per (batch, KV head, head chunk, block of BQ queries); its rows are
the group's query heads times the queries, so each K/V tile of the union of the block's windows is
loaded once and used by every head (GQA sharing) in one [rows x D]·[D x BLOCK_N] tl.dot. Loop bounds
come from the block's positions (dynamic: compile once). Returns out (fp32) and lse (fp32, -inf for
an empty window).

Backward, with a given lse and Δ per row (the caller folds the K branches into one effective lse/Δ, see
grad.py): dQ query-major in the forward's tiling; dK/dV key-major — one program per (key block, KV group)
loops over the position-sorted queries whose window reaches the block, times the group's heads. Each
program owns what it writes: no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import block_d, dot_precision, head_rows, tma_descriptors
from .rules import LN2, LOG2E, window_lo


@triton.jit
def _rows(pid_q, pid_g, N_CHUNKS, H_Q, H_KV, L_Q, G, GH: tl.constexpr, BQ: tl.constexpr):
    chunk = pid_g % N_CHUNKS
    bh = pid_g // N_CHUNKS
    b = bh // H_KV
    hkv = bh % H_KV
    rows = tl.arange(0, GH * BQ)
    g = chunk * GH + rows // BQ
    qi = pid_q * BQ + rows % BQ
    ok = (g < G) & (qi < L_Q)
    base = (b * H_Q + hkv * G + g).to(tl.int64) * L_Q + qi
    return b, hkv, qi, ok, base


@triton.jit
def kv_block(k_base, v_base, sk_l, sv_l, cols, d, dmask, hi, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """K and V rows `cols` of one key block ([BLOCK_N, D] each; `d`/`dmask` the head-dim lanes). MASKED reads no key
    past `hi` (zeros there); unmasked blocks lie inside [0, hi] and skip the check (`interior`)."""
    kv_ptr = cols[:, None].to(tl.int64)
    if MASKED:
        kv_mask = (cols <= hi)[:, None] & dmask[None, :]
        kk = tl.load(k_base + kv_ptr * sk_l + d[None, :], mask=kv_mask, other=0.0)
        vv = tl.load(v_base + kv_ptr * sv_l + d[None, :], mask=kv_mask, other=0.0)
    elif EVEN_D:
        kk = tl.load(k_base + kv_ptr * sk_l + d[None, :])
        vv = tl.load(v_base + kv_ptr * sv_l + d[None, :])
    else:
        kk = tl.load(k_base + kv_ptr * sk_l + d[None, :], mask=dmask[None, :], other=0.0)
        vv = tl.load(v_base + kv_ptr * sv_l + d[None, :], mask=dmask[None, :], other=0.0)
    return kk, vv


@triton.jit
def allowed_keys(cols, lo_col, hi_col, row_ok):
    """[rows, BLOCK_N]: key `cols` lies in the row's allowed range [lo_col, hi_col] and the row is live."""
    return row_ok[:, None] & (cols[None, :] >= lo_col[:, None]) & (cols[None, :] <= hi_col[:, None])


@triton.jit
def fwd_step(q, k_base, v_base, sk_l, sv_l, n0, d, dmask, lo_col, hi_col, row_ok, hi, m, l, acc, qk_scale,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
             FOLD: tl.constexpr):
    """One key block of a flash-style online softmax in base 2 (window and span forwards): rows attend keys
    [lo_col, hi_col] (per row, [rows]); `m` is the running max of logits·log2(e), (l, acc) the sum and fp32 output.
    MASKED = False for a block inside every row's range and inside [0, hi] (no per-key mask, no bounds check:
    the tile's interior, see `interior`). The block's math: `fwd_fold`."""
    cols = n0 + tl.arange(0, BLOCK_N)
    kk, vv = kv_block(k_base, v_base, sk_l, sv_l, cols, d, dmask, hi, MASKED, EVEN_D)
    return fwd_fold(q, kk, vv, cols, lo_col, hi_col, row_ok, m, l, acc, qk_scale, MASKED, PRECISION, FOLD)


@triton.jit
def fwd_fold(q, kk, vv, cols, lo_col, hi_col, row_ok, m, l, acc, qk_scale, MASKED: tl.constexpr,
             PRECISION: tl.constexpr, FOLD: tl.constexpr):
    """Fold key block `cols` (K and V rows kk, vv [BLOCK_N, D]) into the online-softmax state (m, l, acc) of `fwd_step`.
    FOLD: the scale is folded into the exponent (one fused multiply-add per logit, exp2(s·c − m), instead of a
    multiply and a subtraction; the row max is taken before scaling, which gives the same m since c > 0)."""
    s = tl.dot(q, tl.trans(kk), input_precision=PRECISION)
    if not FOLD:
        s = s * qk_scale
    if MASKED:
        allowed = allowed_keys(cols, lo_col, hi_col, row_ok)
        s = tl.where(allowed, s, float("-inf"))
    if FOLD:
        m_new = tl.maximum(m, tl.max(s, axis=1) * qk_scale)
    else:
        m_new = tl.maximum(m, tl.max(s, axis=1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m - m_use)
    if FOLD:
        p = tl.exp2(s * qk_scale - m_use[:, None])
    else:
        p = tl.exp2(s - m_use[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def interior(lo_col, hi_col, row_ok, first, BLOCK_N: tl.constexpr):
    """[a, e): the key blocks (multiples of BLOCK_N, from `first`) that lie inside [lo_col, hi_col] of every row
    with row_ok (an empty range if some row's own range is empty); rows without row_ok do not count."""
    in_lo = tl.max(tl.where(row_ok, lo_col, -1), axis=0)
    in_hi = tl.min(tl.where(row_ok, hi_col, 1 << 62), axis=0)
    a = tl.maximum(((in_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, first)
    e = ((in_hi + 1) // BLOCK_N) * BLOCK_N
    empty = e <= a
    return tl.where(empty, first, a), tl.where(empty, first, e)


@triton.jit
def fwd_blocks(q, k_base, v_base, sk_l, sv_l, d, dmask, lo_col, hi_col, row_ok, lo, hi, m, l, acc, qk_scale,
               k_desc, v_desc, b, hkv,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_D: tl.constexpr,
               PRECISION: tl.constexpr, FOLD: tl.constexpr, TMA: tl.constexpr):
    """Every key block from `lo` to `hi` through `fwd_step` (window and span forwards). With SPLIT the blocks inside
    every row's [lo_col, hi_col] (`interior`) run without masks and only the edge blocks are masked. TMA: the
    interior blocks are read through TMA (k_desc/v_desc: tensor descriptors of K and V [B, H_KV, L_KV, D], blocks
    [1, 1, BLOCK_N, BLOCK_D], read at batch b, KV head hkv; None without TMA). Returns the online-softmax state
    (m, l, acc), base 2. (Triton 3.6's Hopper warp specialization, `tl.range(warp_specialize=True)` on the TMA loop,
    fails in its NVGPUWarpSpecialization pass on this kernel.)"""
    if SPLIT:
        a, e = interior(lo_col, hi_col, row_ok, lo, BLOCK_N)
    else:
        a = lo
        e = lo
    for n0 in range(lo, a, BLOCK_N):
        m, l, acc = fwd_step(q, k_base, v_base, sk_l, sv_l, n0, d, dmask, lo_col, hi_col, row_ok, hi, m, l, acc,
                             qk_scale, BLOCK_N, True, EVEN_D, PRECISION, FOLD)
    if TMA:
        for n0 in range(a, e, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kk = k_desc.load([b, hkv, n0.to(tl.int32), 0]).reshape([BLOCK_N, BLOCK_D])  # positions fit int32
            vv = v_desc.load([b, hkv, n0.to(tl.int32), 0]).reshape([BLOCK_N, BLOCK_D])
            m, l, acc = fwd_fold(q, kk, vv, cols, lo_col, hi_col, row_ok, m, l, acc, qk_scale, False, PRECISION,
                                 FOLD)
    else:
        for n0 in range(a, e, BLOCK_N):
            m, l, acc = fwd_step(q, k_base, v_base, sk_l, sv_l, n0, d, dmask, lo_col, hi_col, row_ok, hi, m, l,
                                 acc, qk_scale, BLOCK_N, False, EVEN_D, PRECISION, FOLD)
    for n0 in range(e, hi + 1, BLOCK_N):
        m, l, acc = fwd_step(q, k_base, v_base, sk_l, sv_l, n0, d, dmask, lo_col, hi_col, row_ok, hi, m, l, acc,
                             qk_scale, BLOCK_N, True, EVEN_D, PRECISION, FOLD)
    return m, l, acc


@triton.jit
def fwd_finish(m, l, acc):
    """(out, lse) of an online-softmax state: out = acc / l, lse natural-log; rows with no key give out 0, lse −inf."""
    nonempty = l > 0
    out = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, (m + tl.log2(tl.where(nonempty, l, 1.0))) * LN2, float("-inf"))
    return out, lse


@triton.jit
def _window_fwd_kernel(q_ptr, k_ptr, v_ptr, k_desc, v_desc, pos_ptr, start_ptr, out_ptr, lse_ptr,
                       sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                       H_Q, H_KV, L_Q, D, G, N_CHUNKS, W, qk_scale,
                       GH: tl.constexpr, BQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       SPLIT: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, FOLD: tl.constexpr,
                       TMA: tl.constexpr):
    b, hkv, qi, ok, base = _rows(tl.program_id(0), tl.program_id(1), N_CHUNKS, H_Q, H_KV, L_Q, G, GH, BQ)
    pos = tl.load(pos_ptr + qi, mask=ok, other=0)
    s = tl.load(start_ptr + b)
    lo_row = window_lo(pos, s, W)
    lo = tl.min(tl.where(ok, lo_row, 1 << 62), axis=0)
    hi = tl.max(tl.where(ok, pos, -1), axis=0)
    lo = (lo // BLOCK_N) * BLOCK_N

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + base[:, None] * D + d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h

    m = tl.full([GH * BQ], float("-inf"), tl.float32)
    l = tl.zeros([GH * BQ], tl.float32)
    acc = tl.zeros([GH * BQ, BLOCK_D], tl.float32)
    m, l, acc = fwd_blocks(q, k_base, v_base, sk_l, sv_l, d, dmask, lo_row, pos, ok, lo, hi, m, l, acc, qk_scale,
                           k_desc, v_desc, b, hkv, BLOCK_N, BLOCK_D, SPLIT, EVEN_D, PRECISION, FOLD,
                           TMA)  # masks only at the edges of the rows' windows
    out, lse = fwd_finish(m, l, acc)
    tl.store(out_ptr + base[:, None] * D + d[None, :], out, mask=ok[:, None] & dmask[None, :])
    tl.store(lse_ptr + base, lse, mask=ok)


# Forward tuning (module constants, swept by bench/fwd_tune.py): rows per program (heads x queries), key block,
# warps, software-pipelining stages, and whether interior blocks skip the masks.
FWD_ROWS = 64
FWD_BLOCK_N = 64
FWD_WARPS = 4
FWD_STAGES = 3
FWD_SPLIT = True
# H200, session 10 window C (last 32K queries of 1M): window 3.05 ms, with FWD_FOLD 2.72, with FWD_FOLD and FWD_TMA
# 2.57 (424 TFLOP/s of useful work). Key indices and masks in int32 instead of int64 were slower (window 2.90 ms with
# FWD_FOLD, span 35.1 vs 31.0 ms) and were removed (session 11).
FWD_FOLD = True  # the scale folded into exp2's argument (`fwd_fold`; window and span forwards)
FWD_TMA = True  # interior key blocks through TMA (compute capability >= 9 only; `common.tma_descriptors`)


def window_forward(q2: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   row_start: torch.Tensor, window: int):
    """Window branch forward.

    Args:
        q2: [B, H_Q, L_Q, D] contiguous; k, v: [B, H_KV, L_KV, D] (unit stride in D);
        positions: int64 [L_Q]; row_start: int64 [B]; window: W >= 0.
    Returns:
        out fp32 [B, H_Q, L_Q, D] (0 for an empty window), lse fp32 [B, H_Q, L_Q] (-inf there).
    """
    b, h_q, l_q, d = q2.shape
    h_kv = k.shape[1]
    if window == 0:
        return (torch.zeros(b, h_q, l_q, d, dtype=torch.float32, device=q2.device),
                torch.full((b, h_q, l_q), float("-inf"), dtype=torch.float32, device=q2.device))
    out = torch.empty(b, h_q, l_q, d, dtype=torch.float32, device=q2.device)  # every row is written below
    lse = torch.empty(b, h_q, l_q, dtype=torch.float32, device=q2.device)
    group = h_q // h_kv
    gh, bq, n_chunks = head_rows(group, l_q, FWD_ROWS)
    bd = block_d(d)
    grid = (triton.cdiv(l_q, bq), b * h_kv * n_chunks)
    block_n = FWD_BLOCK_N if bd <= 128 else 32
    k_desc, v_desc, tma = tma_descriptors(k, v, block_n, bd, FWD_TMA)
    _window_fwd_kernel[grid](
        q2, k, v, k_desc, v_desc, positions, row_start, out, lse,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h_q, h_kv, l_q, d, group, n_chunks, window, d ** -0.5 * LOG2E.value,
        GH=gh, BQ=bq, BLOCK_N=block_n, BLOCK_D=bd, SPLIT=FWD_SPLIT, EVEN_D=bd == d,
        PRECISION=dot_precision(q2.dtype), FOLD=FWD_FOLD, TMA=tma, num_warps=FWD_WARPS,
        num_stages=FWD_STAGES)
    return out, lse


@triton.jit
def _window_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, start_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                          sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                          H_Q, H_KV, L_Q, D, G, N_CHUNKS, W, qk_scale,
                          GH: tl.constexpr, BQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          SPLIT: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, DOTS: tl.constexpr):
    """dQ of the window rows, query-major: the program owns its rows, so dQ is stored, not added (`dq_blocks`, base 2:
    qk_scale = D^-1/2·log2(e)). DOTS: instead, each row's Σ_j P_j (dO·V_j) over its window (= dO·O_win with the
    window's own lse), stored into fp32 dq_ptr [rows] (grad.branch_dots)."""
    b, hkv, qi, ok, base = _rows(tl.program_id(0), tl.program_id(1), N_CHUNKS, H_Q, H_KV, L_Q, G, GH, BQ)
    pos = tl.load(pos_ptr + qi, mask=ok, other=0)
    s = tl.load(start_ptr + b)
    lo_row = window_lo(pos, s, W)
    lo = tl.min(tl.where(ok, lo_row, 1 << 62), axis=0)
    hi = tl.max(tl.where(ok, pos, -1), axis=0)
    lo = (lo // BLOCK_N) * BLOCK_N

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = ok[:, None] & dmask[None, :]
    q = tl.load(q_ptr + base[:, None] * D + d[None, :], mask=m2, other=0.0)
    do = tl.load(do_ptr + base[:, None] * D + d[None, :], mask=m2, other=0.0).to(q.dtype)
    lse2 = tl.load(lse_ptr + base, mask=ok, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + base, mask=ok, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h

    dq = tl.zeros([GH * BQ, BLOCK_D], tl.float32)
    dots = tl.zeros([GH * BQ], tl.float32)
    dq, dots = dq_blocks(q, do, lse2, delta, k_base, v_base, sk_l, sv_l, d, dmask, lo_row, pos, ok, lo, hi, dq, dots,
                         qk_scale, BLOCK_N, SPLIT, DOTS, EVEN_D, PRECISION)  # masks only at the windows' edges
    if DOTS:
        tl.store(dq_ptr + base, dots, mask=ok)
    else:
        tl.store(dq_ptr + base[:, None] * D + d[None, :], dq * (qk_scale * LN2), mask=m2)


@triton.jit
def dq_block(q, do, lse2, delta, k_base, v_base, sk_l, sv_l, n0, d, dmask, lo_col, hi_col, row_ok, hi, dq, dots,
             qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOTS: tl.constexpr, EVEN_D: tl.constexpr,
             PRECISION: tl.constexpr):
    """One key block of the query-major backward (window and span dQ kernels): P = 2^(logits·log2(e) − lse2)
    recomputed from the stored lse (lse2 = lse·log2(e); a row with lse = +inf gets P = 0), dP = dO·Vᵀ; then
    dQ += (P (dP − Δ))·K (in units of 1/qk_scale), or with DOTS the rows' Σ P·dP. MASKED: P only on the rows' allowed
    keys [lo_col, hi_col] and no key past `hi` read; MASKED = False for a block inside every row's range (`interior`),
    as in `fwd_step`."""
    cols = n0 + tl.arange(0, BLOCK_N)
    kk, vv = kv_block(k_base, v_base, sk_l, sv_l, cols, d, dmask, hi, MASKED, EVEN_D)
    p = tl.exp2(tl.dot(q, tl.trans(kk), input_precision=PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        allowed = allowed_keys(cols, lo_col, hi_col, row_ok)
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(vv), input_precision=PRECISION)
    if DOTS:
        dots += tl.sum(p * dp, axis=1)
    else:
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(q.dtype), kk, input_precision=PRECISION)
    return dq, dots


@triton.jit
def dq_blocks(q, do, lse2, delta, k_base, v_base, sk_l, sv_l, d, dmask, lo_col, hi_col, row_ok, lo, hi, dq, dots,
              qk_scale, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOTS: tl.constexpr, EVEN_D: tl.constexpr,
              PRECISION: tl.constexpr):
    """Every key block from `lo` to `hi` through `dq_block` (window and span dQ kernels); with SPLIT the blocks inside
    every row's [lo_col, hi_col] (`interior`) skip the masks, as `fwd_blocks` does. Returns (dq, dots)."""
    if SPLIT:
        a, e = interior(lo_col, hi_col, row_ok, lo, BLOCK_N)
    else:
        a = lo
        e = lo
    for n0 in range(lo, a, BLOCK_N):
        dq, dots = dq_block(q, do, lse2, delta, k_base, v_base, sk_l, sv_l, n0, d, dmask, lo_col, hi_col, row_ok, hi,
                            dq, dots, qk_scale, BLOCK_N, True, DOTS, EVEN_D, PRECISION)
    for n0 in range(a, e, BLOCK_N):
        dq, dots = dq_block(q, do, lse2, delta, k_base, v_base, sk_l, sv_l, n0, d, dmask, lo_col, hi_col, row_ok, hi,
                            dq, dots, qk_scale, BLOCK_N, False, DOTS, EVEN_D, PRECISION)
    for n0 in range(e, hi + 1, BLOCK_N):
        dq, dots = dq_block(q, do, lse2, delta, k_base, v_base, sk_l, sv_l, n0, d, dmask, lo_col, hi_col, row_ok, hi,
                            dq, dots, qk_scale, BLOCK_N, True, DOTS, EVEN_D, PRECISION)
    return dq, dots


@triton.jit
def kv_grad_step(kk, vv, q, do, lse, delta, allowed, dk, dv, scale, PRECISION: tl.constexpr,
                 MASKED: tl.constexpr = True, EXP2: tl.constexpr = False):
    """Add one block of query rows' share to a key block's (dK / scale, dV), both [BLOCK_N, D] fp32, in the key-major
    backward (window here, spans in span.py): kk, vv [BLOCK_N, D] the block's keys and values; q, do [rows, D] (do in
    q's dtype); lse, delta [rows] (delta = rowsum(dO ∘ O)); allowed [BLOCK_N, rows] which (key, row) pairs attend.
    P is recomputed from the stored lse: P = exp(q·k·scale − lse), dS = P (dO·v − delta). MASKED = False: every key
    of the block attends for every row (`allowed` unused; a dead row has lse = +inf, so P = 0 for it).
    EXP2: P as 2^(q·k·scale·log2(e) − lse·log2(e)) (one FFMA and one ex2.approx.ftz per element; `tl.exp` lowers to a
    non-flush ex2 with a denormal fix-up, ~6 instructions per element)."""
    if EXP2:
        logits_t = tl.dot(kk, tl.trans(q), input_precision=PRECISION) * (scale * LOG2E)  # [BLOCK_N, rows], base 2
        p_t = tl.exp2(logits_t - (lse * LOG2E)[None, :])
    else:
        logits_t = tl.dot(kk, tl.trans(q), input_precision=PRECISION) * scale  # [BLOCK_N, rows]
        p_t = tl.exp(logits_t - lse[None, :])
    if MASKED:
        p_t = tl.where(allowed, p_t, 0.0)
    dv += tl.dot(p_t.to(q.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(vv, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _window_kv_trips(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols, d, dmask, rows, g,
                     b, hkv, s, first, last, q_hi, H_Q, L_Q, D, G, W, scale,
                     BQ: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, EXP2: tl.constexpr,
                     I32: tl.constexpr):
    """The window dK/dV kernel's loop trips over the position-sorted queries [first, last) (BQ queries times the
    chunk's heads per trip; queries from q_hi on are dead rows). MASKED = False: trips whose every query's window
    holds the whole key block, computed without the per-key mask."""
    for q0 in range(first, last, BQ):
        si = q0 + rows % BQ  # index into the position-sorted queries
        ok = (si < q_hi) & (g < G)
        qi = tl.load(order_ptr + si, mask=ok, other=0)
        base = (b * H_Q + hkv * G + g).to(tl.int64) * L_Q + qi
        m2 = ok[:, None] & dmask[None, :]
        q = tl.load(q_ptr + base[:, None] * D + d[None, :], mask=m2, other=0.0)
        do = tl.load(do_ptr + base[:, None] * D + d[None, :], mask=m2, other=0.0).to(q.dtype)
        lse = tl.load(lse_ptr + base, mask=ok, other=float("inf"))
        delta = tl.load(delta_ptr + base, mask=ok, other=0.0)
        if MASKED:
            pos = tl.load(spos_ptr + si, mask=ok, other=0)
            if I32:  # positions < 2^31: 32-bit compares on the [BLOCK_N, rows] mask
                pos = pos.to(tl.int32)
            lo_row = window_lo(pos, s, W)
            allowed = ok[None, :] & (cols[:, None] >= lo_row[None, :]) & (cols[:, None] <= pos[None, :])
        else:
            allowed = ok[None, :]
        dk, dv = kv_grad_step(kk, vv, q, do, lse, delta, allowed, dk, dv, scale, PRECISION, MASKED, EXP2)
    return dk, dv


@triton.jit
def _window_kv_part(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols, d, dmask, rows, g,
                    b, hkv, s, first, last, a, e, q_hi, H_Q, L_Q, D, G, W, scale,
                    BQ: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, EXP2: tl.constexpr,
                    I32: tl.constexpr):
    """The trips [first, last) of a run (bounds BQ-aligned from the run's start, or last = q_hi): under the mask
    outside [a, e), without it inside (SPLIT; else all masked)."""
    if SPLIT:
        dk, dv = _window_kv_trips(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols, d,
                                  dmask, rows, g, b, hkv, s, first, tl.minimum(a, last), q_hi, H_Q, L_Q, D, G, W,
                                  scale, BQ, PRECISION, True, EXP2, I32)
        dk, dv = _window_kv_trips(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols, d,
                                  dmask, rows, g, b, hkv, s, tl.maximum(first, a), tl.minimum(e, last), q_hi, H_Q,
                                  L_Q, D, G, W, scale, BQ, PRECISION, False, EXP2, I32)
        dk, dv = _window_kv_trips(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols, d,
                                  dmask, rows, g, b, hkv, s, tl.maximum(first, e), last, q_hi, H_Q, L_Q, D, G, W,
                                  scale, BQ, PRECISION, True, EXP2, I32)
    else:
        dk, dv = _window_kv_trips(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols, d,
                                  dmask, rows, g, b, hkv, s, first, last, q_hi, H_Q, L_Q, D, G, W, scale, BQ,
                                  PRECISION, True, EXP2, I32)
    return dk, dv


@triton.jit
def _window_bwd_kv_kernel(q_ptr, k_ptr, v_ptr, order_ptr, spos_ptr, qrange_ptr, start_ptr, do_ptr, lse_ptr,
                          delta_ptr, dk_ptr, dv_ptr,
                          sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                          H_Q, H_KV, L_Q, L_KV, D, G, N_CHUNKS, W, scale,
                          GH: tl.constexpr, BQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr, SPLIT: tl.constexpr, EXP2: tl.constexpr, I32: tl.constexpr,
                          ROTATE: tl.constexpr = 0):
    """dK, dV of one key block of one KV group, key-major: the program loops over the queries whose window
    can hold the block (a contiguous run of the position-sorted queries) times the group's heads, keeps dK
    and dV in registers and stores them once (no atomics). SPLIT: the whole trips inside the run of queries whose
    window holds the whole block (`window_query_ranges`' [a, e)) run without the per-key mask, the rest under it.
    I32: the row start, the query runs and the positions in 32-bit integers (all < 2^31; int64 only for addresses).
    ROTATE (`KV_ROTATE`, `kv_rotate`: the programs resident at once; 0 in order): the run of trips is visited from
    trip (pid · P / ROTATE) mod P of a period P (the mean trips per run: one int64 after the runs in qrange_ptr),
    counted in absolute BQ-query trips and brought into the run, pid = the launch index, then wraps around
    (`_window_kv_part` on both parts), so programs launched one after another read their shared queries at about the
    same time."""
    kb = tl.program_id(0)
    grp = tl.program_id(1)
    b = grp // H_KV
    hkv = grp % H_KV
    s = tl.load(start_ptr + b)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    k0 = kb * BLOCK_N
    cols = k0 + tl.arange(0, BLOCK_N)
    kv_mask = (cols < L_KV)[:, None] & dmask[None, :]
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
    kk = tl.load(k_base + cols[:, None].to(tl.int64) * sk_l + d[None, :], mask=kv_mask, other=0.0)
    vv = tl.load(v_base + cols[:, None].to(tl.int64) * sv_l + d[None, :], mask=kv_mask, other=0.0)
    q_lo = tl.load(qrange_ptr + 4 * kb)
    q_hi = tl.load(qrange_ptr + 4 * kb + 1)
    if I32:
        s = s.to(tl.int32)
        q_lo = q_lo.to(tl.int32)
        q_hi = q_hi.to(tl.int32)
    if SPLIT:  # the whole trips (BQ queries each, counted from q_lo) inside [i_a, i_e); none if the row starts after k0
        i_a = tl.load(qrange_ptr + 4 * kb + 2)
        i_e = tl.load(qrange_ptr + 4 * kb + 3)
        if I32:
            i_a = i_a.to(tl.int32)
            i_e = i_e.to(tl.int32)
        a = q_lo + ((i_a - q_lo + BQ - 1) // BQ) * BQ
        e = q_lo + ((i_e - q_lo) // BQ) * BQ
        empty = (e <= a) | (s > k0)
        a = tl.where(empty, q_lo, a)
        e = tl.where(empty, q_lo, e)
    else:
        a = q_lo
        e = q_lo

    rows = tl.arange(0, GH * BQ)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if ROTATE:
        n_trips = tl.maximum((q_hi - q_lo + BQ - 1) // BQ, 1)
        period = tl.maximum(tl.load(qrange_ptr + 4 * tl.num_programs(0)), 1)
        shift = ((grp.to(tl.int64) * tl.num_programs(0) + kb) * period // ROTATE - q_lo // BQ) % period
        shift = tl.where(shift < 0, shift + period, shift) % n_trips
        mid = (q_lo + shift * BQ).to(q_lo.dtype)
    for chunk in range(0, N_CHUNKS):  # outside: the loop over queries is the innermost one
        g = chunk * GH + rows // BQ
        if ROTATE:
            dk, dv = _window_kv_part(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols, d,
                                     dmask, rows, g, b, hkv, s, mid, q_hi, a, e, q_hi, H_Q, L_Q, D, G, W, scale, BQ,
                                     PRECISION, SPLIT, EXP2, I32)
            dk, dv = _window_kv_part(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols, d,
                                     dmask, rows, g, b, hkv, s, q_lo, mid, a, e, q_hi, H_Q, L_Q, D, G, W, scale, BQ,
                                     PRECISION, SPLIT, EXP2, I32)
        elif SPLIT:
            dk, dv = _window_kv_trips(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols,
                                      d, dmask, rows, g, b, hkv, s, q_lo, a, q_hi, H_Q, L_Q, D, G, W, scale, BQ,
                                      PRECISION, True, EXP2, I32)
            dk, dv = _window_kv_trips(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols,
                                      d, dmask, rows, g, b, hkv, s, a, e, q_hi, H_Q, L_Q, D, G, W, scale, BQ,
                                      PRECISION, False, EXP2, I32)
        if not ROTATE:
            dk, dv = _window_kv_trips(q_ptr, order_ptr, spos_ptr, do_ptr, lse_ptr, delta_ptr, kk, vv, dk, dv, cols,
                                      d, dmask, rows, g, b, hkv, s, e, q_hi, q_hi, H_Q, L_Q, D, G, W, scale, BQ,
                                      PRECISION, True, EXP2, I32)
    off = (grp.to(tl.int64) * L_KV + cols[:, None]) * D + d[None, :]  # dk/dv: contiguous fp32 [B, H_KV, L_KV, D]
    tl.store(dk_ptr + off, dk * scale, mask=kv_mask)
    tl.store(dv_ptr + off, dv, mask=kv_mask)


KV_BLOCK = 128  # keys per program of the key-major backward kernels (window and span)
KV_WARPS = 8  # warps of those kernels for D >= 128 (4 below): dK and dV stay in registers
KV_STAGES = 1  # software-pipelining stages of those kernels
# The window's dK/dV kernel runs the loop trips whose queries' windows all hold the whole key block without the
# per-key mask (e5288e6's window half). H200, session 8 window A: window dK/dV 45.8 -> 33.4 ms in a 128K step's
# profile, step 128K 293.4-295.0 -> 281.3 ms, 256K 736.1-736.8 -> 713.5 ms.
KV_SPLIT = True
KV_ROWS = 64  # rows (heads x queries) per loop trip of the window's dK/dV kernel
# Both key-major dK/dV kernels compute P with exp2 on base-2 logits (`kv_grad_step`'s EXP2: ftz ex2, no denormal
# fix-up) instead of `tl.exp`. Session 9, for window A (sm_90 SASS, Triton 3.6): 4 fewer instructions per element of
# the [keys x rows] tile, 128 of the span loop's ~1,195 per visit.
KV_EXP2 = True
# The window dK/dV kernel's row start, query runs and positions in int32 (its mask compares were 64-bit).
KV_I32 = True
# Visit order of the window dK/dV kernel's run of query trips: 0 in order; n > 0: each run starts at the trip
# ≡ pid · P / n (mod P), P = the mean trips per run, pid = the launch index, and wraps around. With n = the programs
# resident at once, a program starts about one program-length / n after the one before it, so neighbouring key blocks
# read their shared queries at about the same time (from L2); in order they read a query ~ BLOCK_N / BQ = 32 trips
# apart (~ 0.13 GB of other reads in between at 132 programs x 32 KB a trip). Same sums, in another order.
# None (the default, `kv_rotate`): n = the device's SM count (one 8-warp program per SM at D >= 128), read once per
# device; 0 in Triton's interpreter, where nothing runs at once (tests set n themselves). H200 (132 SMs), session 13,
# bench/bwd_tune.py: backward alone at 128K 172.3 -> 169.5 ms with 132 (the only one of session 11's four backward
# switches that helped, ~1.6 %); train step with it (and the span dK/dV's rotation, since removed: alone it gave
# nothing) 32K 39.6 -> 38.7 ms, 64K 92.6 -> 90.0, 128K 226.6 -> 222.9, 256K 603.8 -> 591.0.
KV_ROTATE = None
DQ_SPLIT = True  # the query-major dQ kernels (window and span) skip the masks on interior key blocks (`dq_blocks`)
DQ_BLOCK_N = 64  # keys per loop trip of the window's dQ kernel (D <= 128; 32 above)
DQ_ROWS = 64  # rows (heads x queries) per program of the window's dQ kernel


def window_query_ranges(positions: torch.Tensor, l_kv: int, window: int, block_n: int):
    """(order, sorted positions, ranges): queries sorted by position, and for each key block j of `block_n` keys
    the run [lo, hi) of sorted queries whose window can reach it (positions in [j·block_n, j·block_n + block_n
    + W − 2]) and inside it the run [a, e) of those whose window holds the whole block if their row starts at or
    before it (positions in [j·block_n + block_n − 1, j·block_n + W − 1]); int64, ranges [n_blocks, 4] (lo, hi,
    a, e). Device tensors only, no host sync."""
    sorted_pos, order = torch.sort(positions)
    first = torch.arange(0, l_kv, block_n, device=positions.device)
    lo = torch.searchsorted(sorted_pos, first, right=False)
    hi = torch.searchsorted(sorted_pos, first + block_n + window - 2, right=True)
    a = torch.searchsorted(sorted_pos, first + block_n - 1, right=False)
    e = torch.maximum(torch.searchsorted(sorted_pos, first + window - 1, right=True), a)
    return order.contiguous(), sorted_pos.contiguous(), torch.stack([lo, hi, a, e], dim=1).contiguous()


def window_backward_dq(q2, k, v, positions, row_start, window, do, lse, delta, dq, dots: bool = False) -> None:
    """dQ of the window branch, *stored* (not added) into fp32 dq [B, H_Q, L_Q, D] (contiguous), so it runs before
    the span dQ adds to it. Zeros with W = 0.

    do [B, H_Q, L_Q, D] in q2's dtype; lse, delta fp32 [B, H_Q, L_Q]: the softmax statistics to use
    (P = exp(logit - lse), dS = P (dO·V - Δ)); lse = +inf makes a row contribute nothing. Query-major: each
    program owns its rows. With `dots`: Σ_j P_j (dO·V_j) over each row's window instead, stored into fp32
    dq [B, H_Q, L_Q] (delta unused).
    """
    if window == 0:
        dq.zero_()
        return
    b, h_q, l_q, d = q2.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    gh, bq, n_chunks = head_rows(group, l_q, DQ_ROWS)
    bd = block_d(d)
    _window_bwd_dq_kernel[(triton.cdiv(l_q, bq), b * h_kv * n_chunks)](
        q2, k, v, positions, row_start, do, lse, delta, dq,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h_q, h_kv, l_q, d, group, n_chunks, window, d ** -0.5 * LOG2E.value,
        GH=gh, BQ=bq, BLOCK_N=DQ_BLOCK_N if bd <= 128 else 32, BLOCK_D=bd, SPLIT=DQ_SPLIT, EVEN_D=bd == d,
        PRECISION=dot_precision(q2.dtype), DOTS=dots, num_warps=4, num_stages=2)


def window_backward_kv(q2, k, v, positions, row_start, window, do, lse, delta, dk, dv) -> None:
    """dK, dV of the window branch, *stored* (not added) into fp32 dk, dv [B, H_KV, L_KV, D] (contiguous), so it
    runs before the span's dK/dV add to them. Zeros with W = 0. Arguments as `window_backward_dq`.
    Key-major (`_window_bwd_kv_kernel`): no atomics.
    """
    if window == 0:
        dk.zero_()
        dv.zero_()
        return
    b, h_q, l_q, d = q2.shape
    h_kv, l_kv = k.shape[1], k.shape[2]
    group = h_q // h_kv
    bd = block_d(d)
    order, sorted_pos, ranges = window_query_ranges(positions, l_kv, window, KV_BLOCK)
    gh, bq, n_chunks = head_rows(group, max(l_q, 64), KV_ROWS)  # rows of one loop trip = heads x queries
    rotate = kv_rotate(k.device)
    if rotate:  # its period after the runs: the mean trips per run (on the device, no host sync)
        period = ((ranges[:, 1] - ranges[:, 0] + bq - 1) // bq).double().mean().round().long().view(1)
        ranges = torch.cat([ranges.view(-1), period])
    _window_bwd_kv_kernel[(triton.cdiv(l_kv, KV_BLOCK), b * h_kv)](
        q2, k, v, order, sorted_pos, ranges, row_start, do, lse, delta, dk, dv,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h_q, h_kv, l_q, l_kv, d, group, n_chunks, window, d ** -0.5,
        GH=gh, BQ=bq, BLOCK_N=KV_BLOCK, BLOCK_D=bd, PRECISION=dot_precision(q2.dtype), SPLIT=KV_SPLIT, EXP2=KV_EXP2,
        I32=KV_I32, ROTATE=rotate,
        num_warps=KV_WARPS if bd >= 128 else 4, num_stages=KV_STAGES)


def kv_rotate(device: torch.device) -> int:
    """The window dK/dV kernel's ROTATE for tensors on `device` (see KV_ROTATE): KV_ROTATE when set, else the SM
    count of a CUDA device (`common.sm_count`), 0 (in order) in the interpreter or off CUDA."""
    if KV_ROTATE is not None:
        return KV_ROTATE
    return common.sm_count(device) if device.type == "cuda" and not common.INTERPRET else 0
