"""Decode (L_Q = 1, docs/algorithm.md §3.7): every branch of a KV group in one pass over the keys, then merge + gate.

One decode step reads K·(B + Fw + 1) span keys per query head plus the window. The query heads of
one KV group choose their spans independently, but the candidate spans overlap about 9-fold
(docs/algorithm.md §1.8), so the spans chosen by a group's heads overlap too: with random routing at 1M the
union of 16 heads x 3 spans is ~0.79 of their sum, and the window is shared by every branch. This
path therefore reads each needed K/V key once per group:

* `_decode_group_kernel`, grid (batch x KV head x row block, key chunk): a program owns CHUNK
  consecutive keys and the rows r = (head g, slot k) of its group (pair index order, so the
  group's qstart/qend are contiguous). One tl.dot gives the logits of every row, each row
  masks them to S_k ∪ Wnd and runs its own online softmax (docs/algorithm.md §3.1: branches are normalised on
  their own). A program reads only the run of blocks between the first and the last key some row
  needs; chunks that no row touches load nothing. Partials (m, ℓ, acc) per (pair, chunk).
* `_decode_merge_kernel`, one program per query row: for each slot, log-sum-exp merges the partials
  of the chunks its span and the window cover (only those can be non-empty) into O_k, ℓ_k
  (both empty gives O_k = 0, ℓ_k = -inf, docs/algorithm.md §3.3), then applies the gate g = softmax(ṽ) (§3.2)
  and writes O = Σ g_k O_k in the model dtype (a row with a non-finite component as NaN in full, the API's rule).

Grids depend only on shapes and L_KV (CUDA-graph friendly); a program past the current position
loads nothing, so the work follows the position, not L_KV (Decision D3 in docs/design.md). A position outside
[0, L_KV) (one held on the device is not checked on the host) reads nothing past the cache and gives NaN rows.

Tried on the H200 (session 5, bench/decode_probe.py) and not kept, both slower at 1M and 128K: a worklist grid (each
program finds the i-th chunk its rows need, grid = a static bound of that count: 1M 0.127 -> 0.145 ms) and
compacted rows (a program attends with only the rows that need its chunk, 16 at a time: 1M 0.127 -> 0.187 ms).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..softmax import INVALID_GATE_LOGIT
from .common import (HAS_PDL, INTERPRET, MAX_SPANS, block_d, dot_precision, gdc_launch_dependents, gdc_wait, next_pow2,
                     pdl_launch, tma_descriptors, tma_ok)
from .rules import LN2, LOG2E, nonfinite_rows, window_lo

DECODE_BLOCK_N = 32  # keys per loop trip (32 and 64 tie on random routing; 32 is ~10% faster on coherent)
DECODE_WARPS = 4  # warps per program (8 where the row x D tile is larger than 64 x 128)
DECODE_MAX_ROWS = 64  # (head, slot) rows per program; a larger group x K is split into row blocks
DECODE_TARGET_CHUNKS = 1024  # key chunks per (batch, KV head) the chunk size aims at (>= 4 programs per SM)
DECODE_MIN_CHUNK = 256
DECODE_MAX_CHUNK = 4096
DECODE_STAGES = 3  # software-pipelining depth of the key loop
DECODE_SCRATCH_BYTES = 64 << 20  # partials (m, ℓ, acc per (pair, chunk)) of one step may take up to this
DECODE_MAX_CHUNKS = 8192  # key chunks per (batch, KV head) at most (most programs of a step find nothing to do)
# `_decode_heads_kernel` instead of `_decode_group_kernel` (K <= MAX_SPANS): the logits once per query head, shared by
# its K slots (a quarter of the QK^T MMA work of the release layer's 64-row tiles, no padding rows in P·V), at most
# DECODE_MAX_HEADS heads per program. H200, session 9 window A: slower — 1M group kernel 107.4 us, heads kernel 144.5
# (133.6 with 64-key blocks; every chunk/stage/warp setting tried 134-169 us): four M = 16 MMA paths cost more than
# one 64-row wgmma tile. Kept for the record and its tests; off.
DECODE_BY_HEADS = False
DECODE_MAX_HEADS = 64
# Programmatic dependent launch between a decode step's four kernels (search, search merge, group, merge; Hopper+,
# Triton >= 3.4): each program waits (gdc_wait) before it reads anything, but is already resident when the previous
# kernel ends, which hides the launch gaps of a graph replay. H200, session 9 window A: 1M graph replay 0.1288 ->
# 0.1246 ms (L2 flushed), bit-identical; only on devices of compute capability >= 9 (`decode_pdl`).
DECODE_PDL = True
# The group kernel's whole key blocks through TMA (tensor descriptors of the caches; only on compute capability >= 9,
# `decode_tma`). H200, session 9 window B: 1M group kernel 105.8 -> 99.8 us, graph replay 0.1240 -> 0.1183 ms (L2
# flushed), bit-identical to the masked loads (window C: 0.1246 -> 0.1191 ms); 64-key blocks 0.1177, 4 stages 0.1253,
# 128-key blocks with 8 warps 0.1890. Session 10: one kernel with a TMA constexpr (no separate TMA kernel), on by
# default after gpu_check --no-timing passed with it on (window A).
DECODE_TMA = True


def decode_chunk(l_kv: int) -> int:
    """Keys per program: a power of two in [DECODE_MIN_CHUNK, DECODE_MAX_CHUNK] giving about
    DECODE_TARGET_CHUNKS chunks over the cache. A function of L_KV only (one grid per cache)."""
    return min(max(next_pow2(-(-l_kv // DECODE_TARGET_CHUNKS)), DECODE_MIN_CHUNK), DECODE_MAX_CHUNK)


def decode_chunk_for(l_kv: int, n_pairs: int, d: int) -> int:
    """`decode_chunk(l_kv)`, made smaller (down to DECODE_MIN_CHUNK) while the partials of the extra chunks fit
    DECODE_SCRATCH_BYTES and there are at most DECODE_MAX_CHUNKS of them. A narrow model (few heads, small D: a
    step reads few keys, in a few long spans) then splits each span over more programs, so the longest program's
    loop — the step's latency — is shorter; for the release layer (B = 1, 32 heads, D = 128, K = 3) the bound
    leaves `decode_chunk` unchanged at every L_KV. n_pairs = B·H_Q·K rows of partials, d = head dim."""
    fit = max(1, min(DECODE_SCRATCH_BYTES // (n_pairs * (d + 2) * 4), DECODE_MAX_CHUNKS))
    return min(decode_chunk(l_kv), max(next_pow2(-(-l_kv // fit)), DECODE_MIN_CHUNK))


@triton.jit
def _group_setup(q_ptr, qstart_ptr, qend_ptr, pos_ptr, start_ptr, pid, c, H_Q, H_KV, L_KV, D, G, W, N_ROWS, N_RB,
                 CHUNK, NUM_SPANS: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a group-kernel program needs before its key loop: its rows (r = g * K + slot of one KV group), their span
    bounds, the window, the run [first, stop) of key blocks of chunk c that some row needs (empty: first = stop) and
    the rows' queries."""
    # Positions fit int32 (L_KV < 2^31, checked by the backend); only pointer offsets are int64.
    rb = pid % N_RB
    bh = pid // N_RB
    b = bh // H_KV
    hkv = bh % H_KV
    r = rb * RB + tl.arange(0, RB)  # row of the group: r = g * K + slot
    rok = r < N_ROWS
    pair = (b * H_Q + hkv * G).to(tl.int64) * NUM_SPANS + r  # index into [B, H_Q, 1, K]
    qrow = (b * H_Q + hkv * G).to(tl.int64) + r // NUM_SPANS
    qs = tl.load(qstart_ptr + pair, mask=rok, other=-1)
    qe = tl.load(qend_ptr + pair, mask=rok, other=-1)
    qe = tl.where(qs >= 0, qe, -1)  # an invalid slot has no span keys (its branch is the window alone)
    qs = tl.where(qs >= 0, qs, 0)

    pos = tl.load(pos_ptr).to(tl.int32)
    s = tl.load(start_ptr + b).to(tl.int32)
    w_lo = window_lo(pos, s, W)
    # Empty window when W = 0, and for a position outside [0, L_KV) (a device-held position is not checked on the
    # host; the merge makes such a step's rows NaN); the search keeps spans inside the cache.
    w_hi = tl.where((W > 0) & (pos < L_KV), pos, w_lo - 1)
    c0 = c * CHUNK
    c1 = tl.minimum(c0 + CHUNK, pos + 1)
    # The keys of this chunk that some row needs lie in [lo, hi]; only that run of blocks is read (a gap
    # between two spans inside one chunk is read and masked, which is rare and cheap).
    span_hit = rok & (qs <= qe) & (qs < c1) & (qe >= c0)
    win_hit = (w_lo <= w_hi) & (w_lo < c1) & (w_hi >= c0)
    lo = tl.min(tl.where(span_hit, tl.maximum(qs, c0), 2147483647), axis=0)
    hi = tl.max(tl.where(span_hit, tl.minimum(qe, c1 - 1), -1), axis=0)
    lo = tl.where(win_hit, tl.minimum(lo, tl.maximum(w_lo, c0)), lo)
    hi = tl.where(win_hit, tl.maximum(hi, tl.minimum(w_hi, c1 - 1)), hi)
    active = hi >= lo
    first = tl.where(active, c0 + ((lo - c0) // BLOCK_N) * BLOCK_N, c0)
    stop = tl.where(active, hi + 1, c0)  # an untouched chunk runs no trips and loads nothing

    d = tl.arange(0, BLOCK_D)
    # (A per-row comparison, not `rok & active`: Triton's CPU interpreter mistypes bool-vector & bool-scalar.)
    q_rows = rok & (r * 0 + hi >= lo)
    q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=q_rows[:, None] & (d < D)[None, :], other=0.0)
    return b, hkv, r, rok, pair, qrow, qs, qe, w_lo, w_hi, first, stop, q


@triton.jit
def _group_masked_tiles(k_base, v_base, cols, stop, d, dmask, sk_l, sv_l, EVEN_D: tl.constexpr):
    """K and V rows `cols` ([BLOCK_N, D] row-major, coalesced along D), zero from `stop` on."""
    cmask = cols < stop
    if EVEN_D:
        ld_mask = cmask[:, None]
    else:
        ld_mask = cmask[:, None] & dmask[None, :]
    offs = cols.to(tl.int64)[:, None]
    kk = tl.load(k_base + offs * sk_l + d[None, :], mask=ld_mask, other=0.0)
    vv = tl.load(v_base + offs * sv_l + d[None, :], mask=ld_mask, other=0.0)
    return kk, vv


@triton.jit
def _group_step(q, kk, vv, cols, stop, qs, qe, w_lo, w_hi, rok, m, l, acc, qk_scale, PRECISION: tl.constexpr):
    """One key block of every row's online softmax (base 2; logits in log2 units, qk_scale = log2(e) / sqrt(D)):
    each row keeps the keys of its S_k ∪ Wnd before `stop`. K enters the dot transposed."""
    in_win = (cols >= w_lo) & (cols <= w_hi)
    keep = (cols[None, :] >= qs[:, None]) & (cols[None, :] <= qe[:, None])
    keep = (keep | in_win[None, :]) & (cols < stop)[None, :] & rok[:, None]  # [RB, BLOCK_N]: key in S_k ∪ Wnd
    logits = tl.dot(q, tl.trans(kk), input_precision=PRECISION) * qk_scale
    return _online_step(tl.where(keep, logits, float("-inf")), m, l, acc, vv, PRECISION)


@triton.jit
def _online_step(x, m, l, acc, vv, PRECISION: tl.constexpr):
    """Fold one block of masked base-2 logits x [rows, BLOCK_N] (-inf where a key is not kept) into each row's
    running max m, normaliser l and accumulator acc [rows, D] (values vv [BLOCK_N, D])."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(x - m_use[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _decode_group_kernel(q_ptr, k_ptr, v_ptr, k_desc, v_desc, qstart_ptr, qend_ptr, pos_ptr, start_ptr,
                         pm_ptr, pl_ptr, pacc_ptr, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                         H_Q, H_KV, L_KV, D, G, W, N_ROWS, N_RB, N_CHUNKS, CHUNK, qk_scale,
                         NUM_SPANS: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         EVEN_D: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr):
    """With TMA the whole key blocks of the run are read through TMA (k_desc/v_desc: tensor descriptors of K and V
    [B, H_KV, L_KV, D], blocks [1, 1, BLOCK_N, BLOCK_D]; None without it) and only the last, partial block (keys from
    `stop` on may lie past the position, where the cache can hold anything) with masked loads."""
    if PDL:  # programmatic dependent launch: wait for the search, let the merge launch
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    c = tl.program_id(1)
    (b, hkv, r, rok, pair, qrow, qs, qe, w_lo, w_hi, first, stop, q) = _group_setup(
        q_ptr, qstart_ptr, qend_ptr, pos_ptr, start_ptr, pid, c, H_Q, H_KV, L_KV, D, G, W, N_ROWS, N_RB, CHUNK,
        NUM_SPANS, RB, BLOCK_N, BLOCK_D)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m = tl.full([RB], float("-inf"), tl.float32)
    l = tl.zeros([RB], tl.float32)
    acc = tl.zeros([RB, BLOCK_D], tl.float32)
    masked_from = first
    if TMA:
        masked_from = first + ((stop - first) // BLOCK_N) * BLOCK_N
        for n0 in range(first, masked_from, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kk = k_desc.load([b, hkv, n0, 0]).reshape([BLOCK_N, BLOCK_D])
            vv = v_desc.load([b, hkv, n0, 0]).reshape([BLOCK_N, BLOCK_D])
            m, l, acc = _group_step(q, kk, vv, cols, stop, qs, qe, w_lo, w_hi, rok, m, l, acc, qk_scale, PRECISION)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
    for n0 in range(masked_from, stop, BLOCK_N):  # the whole run, or (TMA) at most its last, partial block
        cols = n0 + tl.arange(0, BLOCK_N)
        kk, vv = _group_masked_tiles(k_base, v_base, cols, stop, d, dmask, sk_l, sv_l, EVEN_D)
        m, l, acc = _group_step(q, kk, vv, cols, stop, qs, qe, w_lo, w_hi, rok, m, l, acc, qk_scale, PRECISION)
    part = pair * N_CHUNKS + c
    tl.store(pm_ptr + part, m, mask=rok)
    tl.store(pl_ptr + part, l, mask=rok)
    tl.store(pacc_ptr + part[:, None] * D + d[None, :], acc, mask=(rok & (l > 0))[:, None] & dmask[None, :])


@triton.jit
def _slot_bounds(qstart_ptr, qend_ptr, head, slot, ok, NUM_SPANS: tl.constexpr):
    """Span bounds [qs, qe] of one slot for a block of heads (an invalid slot gets the empty span [0, -1])."""
    qs = tl.load(qstart_ptr + head * NUM_SPANS + slot, mask=ok, other=-1)
    qe = tl.load(qend_ptr + head * NUM_SPANS + slot, mask=ok, other=-1)
    return tl.where(qs >= 0, qs, 0), tl.where(qs >= 0, qe, -1)


@triton.jit
def _slot_run(qs, qe, ok, c0, c1, lo, hi):
    """(lo, hi) widened by the keys of chunk [c0, c1) that one slot's spans need."""
    hit = ok & (qs <= qe) & (qs < c1) & (qe >= c0)
    lo = tl.minimum(lo, tl.min(tl.where(hit, tl.maximum(qs, c0), 2147483647), axis=0))
    hi = tl.maximum(hi, tl.max(tl.where(hit, tl.minimum(qe, c1 - 1), -1), axis=0))
    return lo, hi


@triton.jit
def _slot_step(logits, cols, qs, qe, in_win, colok, m, l, acc, vv, PRECISION: tl.constexpr):
    """One key block of one slot's online softmax (base 2): the heads' shared logits masked to S_k ∪ Wnd."""
    keep = ((cols[None, :] >= qs[:, None]) & (cols[None, :] <= qe[:, None])) | in_win[None, :]
    return _online_step(tl.where(keep & colok, logits, float("-inf")), m, l, acc, vv, PRECISION)


@triton.jit
def _slot_store(pm_ptr, pl_ptr, pacc_ptr, head, slot, c, m, l, acc, ok, d, dmask, D, N_CHUNKS,
                NUM_SPANS: tl.constexpr):
    part = (head * NUM_SPANS + slot) * N_CHUNKS + c
    tl.store(pm_ptr + part, m, mask=ok)
    tl.store(pl_ptr + part, l, mask=ok)
    tl.store(pacc_ptr + part[:, None] * D + d[None, :], acc, mask=(ok & (l > 0))[:, None] & dmask[None, :])


@triton.jit
def _decode_heads_kernel(q_ptr, k_ptr, v_ptr, qstart_ptr, qend_ptr, pos_ptr, start_ptr, pm_ptr, pl_ptr, pacc_ptr,
                         sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                         H_Q, H_KV, L_KV, D, G, W, N_HB, N_CHUNKS, CHUNK, qk_scale,
                         NUM_SPANS: tl.constexpr, GH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         EVEN_D: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """`_decode_group_kernel` with the logits computed once per query head (a [GH, BLOCK_N] tl.dot) and shared by
    the head's K <= 4 slots, each slot keeping its own online softmax and [GH, D] accumulator: a (head, slot) row's
    logits are its head's, only the mask differs. Same chunks, same partials layout (pair = head * K + slot)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    c = tl.program_id(1)
    hb = pid % N_HB
    bh = pid // N_HB
    b = bh // H_KV
    hkv = bh % H_KV
    g = hb * GH + tl.arange(0, GH)
    gok = g < G
    head = (b * H_Q + hkv * G).to(tl.int64) + g  # row of [B, H_Q] (L_Q = 1)
    pos = tl.load(pos_ptr).to(tl.int32)
    s = tl.load(start_ptr + b).to(tl.int32)
    w_lo = window_lo(pos, s, W)
    w_hi = tl.where((W > 0) & (pos < L_KV), pos, w_lo - 1)  # (as in _decode_group_kernel)
    c0 = c * CHUNK
    c1 = tl.minimum(c0 + CHUNK, pos + 1)
    win_hit = (w_lo <= w_hi) & (w_lo < c1) & (w_hi >= c0)
    lo = tl.where(win_hit, tl.maximum(w_lo, c0), 2147483647)
    hi = tl.where(win_hit, tl.minimum(w_hi, c1 - 1), -1)
    qs0, qe0 = _slot_bounds(qstart_ptr, qend_ptr, head, 0, gok, NUM_SPANS)
    lo, hi = _slot_run(qs0, qe0, gok, c0, c1, lo, hi)
    if NUM_SPANS > 1:
        qs1, qe1 = _slot_bounds(qstart_ptr, qend_ptr, head, 1, gok, NUM_SPANS)
        lo, hi = _slot_run(qs1, qe1, gok, c0, c1, lo, hi)
    if NUM_SPANS > 2:
        qs2, qe2 = _slot_bounds(qstart_ptr, qend_ptr, head, 2, gok, NUM_SPANS)
        lo, hi = _slot_run(qs2, qe2, gok, c0, c1, lo, hi)
    if NUM_SPANS > 3:
        qs3, qe3 = _slot_bounds(qstart_ptr, qend_ptr, head, 3, gok, NUM_SPANS)
        lo, hi = _slot_run(qs3, qe3, gok, c0, c1, lo, hi)
    first = tl.where(hi >= lo, c0 + ((lo - c0) // BLOCK_N) * BLOCK_N, c0)
    stop = tl.where(hi >= lo, hi + 1, c0)  # an untouched chunk runs no trips and loads nothing

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q_rows = gok & (g * 0 + hi >= lo)
    q = tl.load(q_ptr + head[:, None] * D + d[None, :], mask=q_rows[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
    m0 = tl.full([GH], float("-inf"), tl.float32)
    l0 = tl.zeros([GH], tl.float32)
    acc0 = tl.zeros([GH, BLOCK_D], tl.float32)
    if NUM_SPANS > 1:
        m1 = tl.full([GH], float("-inf"), tl.float32)
        l1 = tl.zeros([GH], tl.float32)
        acc1 = tl.zeros([GH, BLOCK_D], tl.float32)
    if NUM_SPANS > 2:
        m2 = tl.full([GH], float("-inf"), tl.float32)
        l2 = tl.zeros([GH], tl.float32)
        acc2 = tl.zeros([GH, BLOCK_D], tl.float32)
    if NUM_SPANS > 3:
        m3 = tl.full([GH], float("-inf"), tl.float32)
        l3 = tl.zeros([GH], tl.float32)
        acc3 = tl.zeros([GH, BLOCK_D], tl.float32)
    for n0 in range(first, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < stop
        if EVEN_D:
            ld_mask = cmask[:, None]
        else:
            ld_mask = cmask[:, None] & dmask[None, :]
        offs = cols.to(tl.int64)[:, None]
        kk = tl.load(k_base + offs * sk_l + d[None, :], mask=ld_mask, other=0.0)
        vv = tl.load(v_base + offs * sv_l + d[None, :], mask=ld_mask, other=0.0)
        in_win = (cols >= w_lo) & (cols <= w_hi)
        colok = cmask[None, :] & gok[:, None]
        logits = tl.dot(q, tl.trans(kk), input_precision=PRECISION) * qk_scale  # [GH, BLOCK_N], once per head
        m0, l0, acc0 = _slot_step(logits, cols, qs0, qe0, in_win, colok, m0, l0, acc0, vv, PRECISION)
        if NUM_SPANS > 1:
            m1, l1, acc1 = _slot_step(logits, cols, qs1, qe1, in_win, colok, m1, l1, acc1, vv, PRECISION)
        if NUM_SPANS > 2:
            m2, l2, acc2 = _slot_step(logits, cols, qs2, qe2, in_win, colok, m2, l2, acc2, vv, PRECISION)
        if NUM_SPANS > 3:
            m3, l3, acc3 = _slot_step(logits, cols, qs3, qe3, in_win, colok, m3, l3, acc3, vv, PRECISION)
    _slot_store(pm_ptr, pl_ptr, pacc_ptr, head, 0, c, m0, l0, acc0, gok, d, dmask, D, N_CHUNKS, NUM_SPANS)
    if NUM_SPANS > 1:
        _slot_store(pm_ptr, pl_ptr, pacc_ptr, head, 1, c, m1, l1, acc1, gok, d, dmask, D, N_CHUNKS, NUM_SPANS)
    if NUM_SPANS > 2:
        _slot_store(pm_ptr, pl_ptr, pacc_ptr, head, 2, c, m2, l2, acc2, gok, d, dmask, D, N_CHUNKS, NUM_SPANS)
    if NUM_SPANS > 3:
        _slot_store(pm_ptr, pl_ptr, pacc_ptr, head, 3, c, m3, l3, acc3, gok, d, dmask, D, N_CHUNKS, NUM_SPANS)


@triton.jit
def _decode_merge_kernel(pm_ptr, pl_ptr, pacc_ptr, qstart_ptr, qend_ptr, values_ptr, anchor_ptr, pos_ptr, start_ptr,
                         bout_ptr, blse_ptr, out_ptr, gate_ptr,
                         H_Q, L_KV, D, W, N_CHUNKS, CHUNK, INVALID,
                         NUM_SPANS: tl.constexpr, KP: tl.constexpr, BC: tl.constexpr, BLOCK_D: tl.constexpr,
                         PDL: tl.constexpr):
    # With PDL the routing (qstart, qend, values, anchors: the search merge's) is read before gdc_wait: this grid
    # launches only once every program of the group kernel has passed its own gdc_wait, i.e. after the search merge
    # ended. The partials (the group kernel's) are read after it.
    row = tl.program_id(0).to(tl.int64)  # b * H_Q + h (L_Q = 1)
    b = row // H_Q
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    slots = tl.arange(0, KP)
    smask = slots < NUM_SPANS
    pair = row * NUM_SPANS + slots
    # Gate (docs/algorithm.md §3.2): softmax over the slots' values, -1e9 for invalid slots.
    val = tl.load(values_ptr + pair, mask=smask, other=0.0)
    anc = tl.load(anchor_ptr + pair, mask=smask, other=-1)
    logit = tl.where(smask, tl.where(anc >= 0, val, INVALID), float("-inf"))
    e = tl.exp(logit - tl.max(logit, axis=0))
    gate = e / tl.sum(e, axis=0)
    tl.store(gate_ptr + pair, gate, mask=smask)

    # Chunks each slot's partials can be non-empty in: its span's, then the window's. A span ends
    # before the window starts (docs/algorithm.md §1.7), so only the span's last chunk can also hold window keys.
    qs = tl.load(qstart_ptr + pair, mask=smask, other=-1)
    qe = tl.load(qend_ptr + pair, mask=smask, other=-1)
    has_span = smask & (qs >= 0) & (qs <= qe)
    s_first = tl.where(has_span, qs // CHUNK, 0)
    n_span = tl.where(has_span, qe // CHUNK - s_first + 1, 0)
    pos = tl.load(pos_ptr).to(tl.int32)
    s = tl.load(start_ptr + b).to(tl.int32)
    w_lo = window_lo(pos, s, W)
    pos_ok = (pos >= 0) & (pos < L_KV)
    has_win = (W > 0) & (w_lo <= pos) & pos_ok
    w_first = tl.where(has_span, tl.maximum(w_lo // CHUNK, qe // CHUNK + 1), w_lo // CHUNK)
    n_win = tl.where(has_win & smask, tl.maximum(pos // CHUNK - w_first + 1, 0), 0)
    n = n_span + n_win
    if PDL:
        gdc_wait()
    top = tl.full([KP], float("-inf"), tl.float32)
    l = tl.zeros([KP], tl.float32)
    acc = tl.zeros([KP, BLOCK_D], tl.float32)
    for j0 in range(0, tl.max(n, axis=0), BC):
        j = j0 + tl.arange(0, BC)[None, :]  # [1, BC]
        chunk = tl.where(j < n_span[:, None], s_first[:, None] + j, w_first[:, None] + j - n_span[:, None])
        ok = j < n[:, None]  # [KP, BC]
        base = pair[:, None] * N_CHUNKS + chunk
        mm = tl.load(pm_ptr + base, mask=ok, other=float("-inf"))
        ll = tl.load(pl_ptr + base, mask=ok, other=0.0)
        # The accumulators are read with m and ℓ (one memory round trip, not two); the group kernel wrote none for a
        # (pair, chunk) without keys (ℓ = 0), so those are zeroed by a select, never multiplied.
        aa = tl.load(pacc_ptr + base[:, :, None] * D + d[None, None, :],
                     mask=ok[:, :, None] & dmask[None, None, :], other=0.0)  # [KP, BC, BLOCK_D]
        live = ok & (ll > 0)
        aa = tl.where(live[:, :, None], aa, 0.0)
        new_top = tl.maximum(top, tl.max(tl.where(live, mm, float("-inf")), axis=1))
        use = tl.where(new_top == float("-inf"), 0.0, new_top)
        alpha = tl.exp2(top - use)
        w = tl.where(live, tl.exp2(mm - use[:, None]), 0.0)
        l = l * alpha + tl.sum(w * ll, axis=1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * aa, axis=1)
        top = new_top
    nonempty = l > 0
    o = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, (top + tl.log2(tl.where(nonempty, l, 1.0))) * LN2, float("-inf"))
    tl.store(bout_ptr + pair[:, None] * D + d[None, :], o, mask=smask[:, None] & dmask[None, :])
    tl.store(blse_ptr + pair, lse, mask=smask)
    out = tl.sum(gate[:, None] * o, axis=0).to(out_ptr.dtype.element_ty).to(tl.float32)
    # The API's non-finite rule, applied here so that a decode step needs no extra launches.
    bad = nonfinite_rows(out, dmask, 0)
    out = tl.where(bad | (pos < 0) | (pos >= L_KV), float("nan"), out)  # (and a position outside the cache)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def decode_pdl(device: torch.device) -> bool:
    """Whether a decode step on `device` launches its kernels with programmatic dependent launch: DECODE_PDL, a CUDA
    device of compute capability >= 9.0 (griddepcontrol) and a Triton that has it (`common.HAS_PDL`)."""
    if not DECODE_PDL or INTERPRET or not HAS_PDL or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def decode_tma(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the group kernel reads its whole key blocks through TMA (its TMA constexpr): DECODE_TMA and caches TMA
    can read (`common.tma_ok`: compute capability >= 9.0, Triton's tensor descriptors, aligned caches)."""
    return DECODE_TMA and tma_ok(k, v)


def decode_forward(q2, k, v, qstart, qend, qanchor, values, positions, row_start, window: int, max_span_len: int):
    """One decode step after the search: branch attention, merge and gate.

    Args:
        q2: [B, H_Q, 1, D] contiguous; k, v: [B, H_KV, L_KV, D] (unit stride in D);
        qstart, qend, qanchor: int32 [B, H_Q, 1, K]; values: fp32 [B, H_Q, 1, K];
        positions: int64 [1]; row_start: int64 [B]; window: W;
        max_span_len: an upper bound of B(t) + Fw(t) + 1 (sizes the merge's chunk tile only).
    Returns:
        out [B, H_Q, 1, D] in q2's dtype, gate fp32 [B, H_Q, 1, K], branch_out fp32 [B, H_Q, 1, K, D]
        and branch_lse fp32 [B, H_Q, 1, K] over S_k ∪ Wnd.
    """
    b, h_q, l_q, d = q2.shape
    h_kv, l_kv = k.shape[1], k.shape[2]
    group = h_q // h_kv
    num_spans = qstart.shape[-1]
    dev = q2.device
    pdl = decode_pdl(dev)
    bd = block_d(d)
    n_pairs = qstart.numel()
    chunk = decode_chunk_for(l_kv, n_pairs, d)
    n_chunks = triton.cdiv(l_kv, chunk)
    n_rows = group * num_spans
    rb = min(max(16, next_pow2(n_rows)), max(16, DECODE_MAX_ROWS))
    n_rb = triton.cdiv(n_rows, rb)
    pm = torch.empty(n_pairs * n_chunks, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty(n_pairs * n_chunks, d, dtype=torch.float32, device=dev)
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    if DECODE_BY_HEADS and num_spans <= MAX_SPANS:
        gh = min(max(16, next_pow2(group)), max(16, next_pow2(DECODE_MAX_HEADS)))
        n_hb = triton.cdiv(group, gh)
        _decode_heads_kernel[(b * h_kv * n_hb, n_chunks)](
            q2, k, v, qstart, qend, positions, row_start, pm, pl, pacc, *strides,
            h_q, h_kv, l_kv, d, group, window, n_hb, n_chunks, chunk, d ** -0.5 * LOG2E.value,
            NUM_SPANS=num_spans, GH=gh, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=bd, EVEN_D=bd == d,
            PRECISION=dot_precision(q2.dtype), PDL=pdl, num_warps=DECODE_WARPS, num_stages=DECODE_STAGES,
            **pdl_launch(pdl))
    else:
        warps = 2 * DECODE_WARPS if bd * rb > 64 * 128 else DECODE_WARPS
        k_desc, v_desc, tma = tma_descriptors(k, v, DECODE_BLOCK_N, bd, DECODE_TMA)  # tma == decode_tma(k, v)
        _decode_group_kernel[(b * h_kv * n_rb, n_chunks)](
            q2, k, v, k_desc, v_desc, qstart, qend, positions, row_start, pm, pl, pacc, *strides,
            h_q, h_kv, l_kv, d, group, window, n_rows, n_rb, n_chunks, chunk, d ** -0.5 * LOG2E.value,
            NUM_SPANS=num_spans, RB=rb, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=bd, EVEN_D=bd == d,
            PRECISION=dot_precision(q2.dtype), PDL=pdl, TMA=tma, num_warps=warps, num_stages=DECODE_STAGES,
            **pdl_launch(pdl))

    out = torch.empty(b, h_q, l_q, d, dtype=q2.dtype, device=dev)
    gate = torch.empty(b, h_q, l_q, num_spans, dtype=torch.float32, device=dev)
    bout = torch.empty(b, h_q, l_q, num_spans, d, dtype=torch.float32, device=dev)
    blse = torch.empty(b, h_q, l_q, num_spans, dtype=torch.float32, device=dev)
    # Chunks one slot's span and the window can touch: the merge folds them in [K, BC] tiles.
    reach = -(-max(max_span_len, 1) // chunk) + -(-max(window, 1) // chunk) + 2
    kp = max(2, next_pow2(num_spans))
    bc = max(2, min(next_pow2(reach), 16))
    _decode_merge_kernel[(b * h_q,)](
        pm, pl, pacc, qstart, qend, values, qanchor, positions, row_start, bout, blse, out, gate,
        h_q, l_kv, d, window, n_chunks, chunk, INVALID_GATE_LOGIT,
        NUM_SPANS=num_spans, KP=kp, BC=bc, BLOCK_D=bd, PDL=pdl, num_warps=8 if kp * bc * bd > 8192 else 4,
        **pdl_launch(pdl))
    return out, gate, bout, blse
