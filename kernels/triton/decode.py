"""Decode branches (L_Q = 1, SPEC §3.7): split-key ("flash-decoding") window and span attention.

One query per row gives too few programs for the prefill layouts, so the keys are split:
* window: programs per (batch, KV head, head chunk, split); the group's query heads are the rows of
  one tl.dot, each split covers DECODE_WINDOW_SPLITS-th of the window's key blocks;
* spans: programs per (pair, split); each split covers a fixed run of keys of the pair's span and the
  last split takes whatever remains, so no key is ever dropped (Decision D5);
* combine: per pair, the window partials and the pair's span partials are merged by log-sum-exp into
  O_k and ℓ_k over S_k ∪ Wnd (SPEC §3.3: both empty gives 0, never NaN).
Grids depend only on shapes and the cache length (CUDA-graph friendly); loops are bounded by the
current position, so work grows with the position, not with L_KV (Decision D3).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_d, dot_precision, next_pow2

DECODE_WINDOW_SPLITS = 16  # programs per (row group) over the window's key blocks
DECODE_SPAN_SPLITS = 8  # programs per (query head, span slot) over the span's keys
DECODE_BLOCK_N = 64  # keys per loop trip


@triton.jit
def _decode_window_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, start_ptr, pm_ptr, pl_ptr, pacc_ptr,
                          sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                          H_Q, H_KV, D, G, N_CHUNKS, W, SPLIT_BLOCKS, N_SPLIT, scale,
                          GH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_s = tl.program_id(1)
    chunk = pid_g % N_CHUNKS
    bh = pid_g // N_CHUNKS
    b = bh // H_KV
    hkv = bh % H_KV
    g = chunk * GH + tl.arange(0, GH)
    ok = g < G
    row = (b * H_Q + hkv * G + g).to(tl.int64)  # L_Q = 1
    pos = tl.load(pos_ptr)
    s = tl.load(start_ptr + b)
    lo = tl.maximum(tl.maximum(pos - W + 1, s), 0)
    first = (lo // BLOCK_N) * BLOCK_N + pid_s.to(tl.int64) * SPLIT_BLOCKS * BLOCK_N
    stop = tl.minimum(pos + 1, first + SPLIT_BLOCKS * BLOCK_N)

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + row[:, None] * D + d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
    m = tl.full([GH], float("-inf"), tl.float32)
    l = tl.zeros([GH], tl.float32)
    acc = tl.zeros([GH, BLOCK_D], tl.float32)
    for n0 in range(first, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = (cols < stop) & (cols >= lo)
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * sk_l + d[:, None],
                     mask=cmask[None, :] & dmask[:, None], other=0.0)
        logits = tl.dot(q, kt, input_precision=PRECISION) * scale
        logits = tl.where(ok[:, None] & cmask[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        p = tl.exp(logits - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        vv = tl.load(v_base + cols[:, None].to(tl.int64) * sv_l + d[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
        m = m_new
    part = row * N_SPLIT + pid_s
    tl.store(pm_ptr + part, m, mask=ok)
    tl.store(pl_ptr + part, l, mask=ok)
    tl.store(pacc_ptr + part[:, None] * D + d[None, :], acc, mask=ok[:, None] & dmask[None, :])


@triton.jit
def _decode_span_kernel(q_ptr, k_ptr, v_ptr, qstart_ptr, qend_ptr, pm_ptr, pl_ptr, pacc_ptr,
                        sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                        H_Q, D, G, SPLIT_LEN, N_SPLIT, scale,
                        NUM_SPANS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row = pair // NUM_SPANS  # L_Q = 1: row = b * H_Q + h
    b = row // H_Q
    hkv = (row % H_Q) // G
    qs = tl.load(qstart_ptr + pair).to(tl.int64)
    qe = tl.load(qend_ptr + pair).to(tl.int64)
    qe = tl.where(qs >= 0, qe, -1)
    first = tl.maximum(qs, 0) + c.to(tl.int64) * SPLIT_LEN
    stop = tl.where(c == N_SPLIT - 1, qe + 1, tl.minimum(qe + 1, first + SPLIT_LEN))
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + row * D + d, mask=dmask, other=0.0).to(tl.float32)
    k_base = k_ptr + b * sk_b + hkv * sk_h
    v_base = v_ptr + b * sv_b + hkv * sv_h
    m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)  # fp32 scalars for the loop carry
    l = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(first, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < stop
        m2 = cmask[:, None] & dmask[None, :]
        kk = tl.load(k_base + cols[:, None] * sk_l + d[None, :], mask=m2, other=0.0).to(tl.float32)
        logits = tl.sum(kk * q[None, :], axis=1) * scale
        logits = tl.where(cmask, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=0))  # finite: the trip holds at least one key
        alpha = tl.exp(m - m_new)
        p = tl.exp(logits - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        vv = tl.load(v_base + cols[:, None] * sv_l + d[None, :], mask=m2, other=0.0)
        pv = p.to(vv.dtype).to(tl.float32)  # P·V operands in the model dtype (SPEC §3.8)
        acc = acc * alpha + tl.sum(pv[:, None] * vv.to(tl.float32), axis=0)
        m = m_new
    part = pair * N_SPLIT + c
    tl.store(pm_ptr + part, m)
    tl.store(pl_ptr + part, l)
    tl.store(pacc_ptr + part * D + d, acc, mask=dmask)


@triton.jit
def _decode_combine_kernel(wm_ptr, wl_ptr, wacc_ptr, sm_ptr, sl_ptr, sacc_ptr, bout_ptr, blse_ptr,
                           D, N_WSPLIT, N_SSPLIT,
                           NUM_SPANS: tl.constexpr, BLOCK_WS: tl.constexpr, BLOCK_SS: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    row = pair // NUM_SPANS
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    w = tl.arange(0, BLOCK_WS)
    wmask = w < N_WSPLIT
    wpart = row * N_WSPLIT + w
    wm = tl.load(wm_ptr + wpart, mask=wmask, other=float("-inf"))
    wl = tl.load(wl_ptr + wpart, mask=wmask, other=0.0)
    wacc = tl.load(wacc_ptr + wpart[:, None] * D + d[None, :], mask=wmask[:, None] & dmask[None, :], other=0.0)
    c = tl.arange(0, BLOCK_SS)
    smask = c < N_SSPLIT
    spart = pair * N_SSPLIT + c
    sm = tl.load(sm_ptr + spart, mask=smask, other=float("-inf"))
    sl = tl.load(sl_ptr + spart, mask=smask, other=0.0)
    sacc = tl.load(sacc_ptr + spart[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    top = tl.maximum(tl.max(wm, axis=0), tl.max(sm, axis=0))
    top = tl.where(top == float("-inf"), 0.0, top)
    ew = tl.exp(wm - top)
    es = tl.exp(sm - top)
    l = tl.sum(ew * wl, axis=0) + tl.sum(es * sl, axis=0)
    acc = tl.sum(ew[:, None] * wacc, axis=0) + tl.sum(es[:, None] * sacc, axis=0)
    nonempty = l > 0
    out = acc / tl.where(nonempty, l, 1.0)
    lse = tl.where(nonempty, top + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
    tl.store(bout_ptr + pair * D + d, out, mask=dmask)
    tl.store(blse_ptr + pair, lse)


def decode_branches(q2, k, v, qstart, qend, positions, row_start, window: int, max_span_len: int):
    """Branch outputs of one decode step.

    Args:
        q2: [B, H_Q, 1, D] contiguous; k, v: [B, H_KV, L_KV, D] (unit stride in D);
        qstart, qend: int32 [B, H_Q, 1, K]; positions: int64 [1]; row_start: int64 [B];
        window: W; max_span_len: an upper bound of B(t) + Fw(t) + 1 (sizes the splits only).
    Returns:
        branch_out fp32 [B, H_Q, 1, K, D] and branch_lse fp32 [B, H_Q, 1, K] over S_k ∪ Wnd.
    """
    b, h_q, l_q, d = q2.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    num_spans = qstart.shape[-1]
    dev = q2.device
    bd = block_d(d)
    bn = DECODE_BLOCK_N
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    n_rows, n_pairs = b * h_q, qstart.numel()

    if window > 0:
        gh = max(16, min(next_pow2(group), 64))  # tl.dot needs >= 16 rows
        n_chunks = -(-group // gh)
        n_ws = DECODE_WINDOW_SPLITS
        split_blocks = -(-(-(-window // bn) + 1) // n_ws)
        wm = torch.empty(n_rows * n_ws, dtype=torch.float32, device=dev)
        wl = torch.empty_like(wm)
        wacc = torch.empty(n_rows * n_ws, d, dtype=torch.float32, device=dev)
        _decode_window_kernel[(b * h_kv * n_chunks, n_ws)](
            q2, k, v, positions, row_start, wm, wl, wacc, *strides,
            h_q, h_kv, d, group, n_chunks, window, split_blocks, n_ws, d ** -0.5,
            GH=gh, BLOCK_N=bn, BLOCK_D=bd, PRECISION=dot_precision(q2.dtype), num_warps=4)
    else:
        n_ws = 0
        wm = wl = torch.empty(1, dtype=torch.float32, device=dev)
        wacc = torch.empty(1, d, dtype=torch.float32, device=dev)

    n_ss = DECODE_SPAN_SPLITS
    split_len = max(1, -(-max_span_len // (n_ss * bn))) * bn
    sm = torch.empty(n_pairs * n_ss, dtype=torch.float32, device=dev)
    sl = torch.empty_like(sm)
    sacc = torch.empty(n_pairs * n_ss, d, dtype=torch.float32, device=dev)
    _decode_span_kernel[(n_pairs, n_ss)](
        q2, k, v, qstart, qend, sm, sl, sacc, *strides,
        h_q, d, group, split_len, n_ss, d ** -0.5,
        NUM_SPANS=num_spans, BLOCK_N=bn, BLOCK_D=bd, num_warps=4)

    bout = torch.empty(b, h_q, l_q, num_spans, d, dtype=torch.float32, device=dev)
    blse = torch.empty(b, h_q, l_q, num_spans, dtype=torch.float32, device=dev)
    _decode_combine_kernel[(n_pairs,)](
        wm, wl, wacc, sm, sl, sacc, bout, blse, d, n_ws, n_ss,
        NUM_SPANS=num_spans, BLOCK_WS=max(2, next_pow2(max(n_ws, 1))), BLOCK_SS=max(2, next_pow2(n_ss)),
        BLOCK_D=bd, num_warps=4)
    return bout, blse
