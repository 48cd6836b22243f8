"""Span branches (docs/algorithm.md §3.1, §3.3, §3.6): each pair (b, h, q, k) attends over its span S_k, starting
from the window branch's softmax state, so the result is directly O_k over S_k ∪ Wnd with its lse.

* **Pair tiles (prefill).** Pairs are sorted by (batch·KV head, first key block, last key block) —
  the bucket key of docs/algorithm.md §3.6 — with one `argsort` on the device. Each KV group owns a fixed,
  contiguous slice of the sorted order (its G·L_Q·K pairs), so the grid is static (no host sync).
  A tile of BLOCK_P sorted pairs (any query heads of the group, any queries) loops over the union of
  its spans, one [BLOCK_P x D]·[D x BLOCK_N] tl.dot per key block, with a per-row range mask on the blocks at
  the edges of the pairs' ranges only (blocks inside every pair's span run unmasked, `window.interior`). The
  loop bound is the tile's own max(qend), never a precomputed cap: no pair is ever dropped, whatever
  its length (Decision D5 in docs/design.md). Sorting makes tiles share their key blocks, so the union stays close to
  one span length.
* **Decode** (L_Q = 1) does not use these tiles: its pairs point anywhere in the cache, so decode.py
  splits each pair's own keys instead.
* **Window fold-in (docs/algorithm.md §3.3).** Each pair starts its online softmax at (m, l, acc) =
  (ℓ_w, 1, O_win) — or (-inf, 0, 0) for an empty window — which is exactly the stable LSE merge:
  both empty gives O_k = 0 = O_win, never NaN.
* **Backward.** dQ2 from the same pair tiles (one atomic add per pair row); dK/dV key-major: one program per
  (key block, KV group) visits the pair tiles whose key range meets its block and owns the block's dK/dV,
  so they take no atomics; it reads the pairs' arrays gathered into sorted order (`KV_SORTED`). P is
  recomputed from the stored lse (no stored probabilities).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, window
from .common import block_d, dot_precision
from .rules import LN2, LOG2E
from .window import dq_blocks, fwd_blocks, fwd_finish, kv_grad_step


def sort_pairs(qstart: torch.Tensor, qend: torch.Tensor, h_kv: int, block_n: int, l_kv: int) -> torch.Tensor:
    """int64 [P]: pair indices (flattened [B, H_Q, L_Q, K]) sorted by (group, qstart block, qend block).

    Pairs of KV group g = b·H_KV + h_kv fill positions [g·Pg, (g+1)·Pg), Pg = P / (B·H_KV); pairs with
    an empty span sort last within their group. The key is one int per pair (`_pair_key_kernel`: int32 where
    every key fits, as at 1M with B·H_KV = 2, else int64; either way the same order), then one `argsort`.
    """
    n_groups = qstart.shape[0] * h_kv
    n_blocks = -(-l_kv // block_n)
    n = qstart.numel()
    wide = max((n_blocks * n_blocks + 1) * n_groups, n) >= 2**31
    key = torch.empty(n, dtype=torch.int64 if wide else torch.int32, device=qstart.device)
    block = 1024
    _pair_key_kernel[(triton.cdiv(n, block),)](qstart.contiguous(), qend.contiguous(), key, n, n // n_groups,
                                               n_blocks, block_n, BLOCK=block, WIDE=wide)
    return torch.argsort(key)


@triton.jit
def _pair_key_kernel(qstart_ptr, qend_ptr, key_ptr, N, PER_GROUP, N_BLOCKS, BLOCK_N, BLOCK: tl.constexpr,
                     WIDE: tl.constexpr):
    """key = group·(N_BLOCKS² + 1) + (qstart // BLOCK_N)·N_BLOCKS + qend // BLOCK_N for a live pair, group·(N_BLOCKS²
    + 1) + N_BLOCKS² for an empty one (group = pair // PER_GROUP); int64 with WIDE, else int32 (the same values)."""
    if WIDE:  # (also where the pair count itself needs int64)
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    qs = tl.load(qstart_ptr + i, mask=ok, other=-1)
    qe = tl.load(qend_ptr + i, mask=ok, other=-1)
    if WIDE:
        qs = qs.to(tl.int64)
        qe = qe.to(tl.int64)
        nb = N_BLOCKS.to(tl.int64)
        grp = (i // PER_GROUP).to(tl.int64)
    else:
        nb = N_BLOCKS
        grp = i // PER_GROUP
    live = (qs >= 0) & (qe >= qs)
    key = tl.where(live, (qs // BLOCK_N) * nb + qe // BLOCK_N, nb * nb) + grp * (nb * nb + 1)
    tl.store(key_ptr + i, key, mask=ok)


@triton.jit
def _pair_rows(order_ptr, qstart_ptr, qend_ptr, grp, tile, PG, H_Q, H_KV, L_Q, G,
               NUM_SPANS: tl.constexpr, BLOCK_P: tl.constexpr):
    r = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = r < PG
    pair = tl.load(order_ptr + grp.to(tl.int64) * PG + r, mask=ok, other=0)
    qs = tl.load(qstart_ptr + pair, mask=ok, other=-1).to(tl.int64)
    qe = tl.load(qend_ptr + pair, mask=ok, other=-1).to(tl.int64)
    live = ok & (qs >= 0) & (qe >= qs)
    row = pair // NUM_SPANS  # flattened [B, H_Q, L_Q]
    return pair, row, ok, live, qs, qe


@triton.jit
def _span_fwd_kernel(q_ptr, k_ptr, v_ptr, k_desc, v_desc, order_ptr, qstart_ptr, qend_ptr, wout_ptr, wlse_ptr,
                     bout_ptr, blse_ptr,
                     sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                     H_Q, H_KV, L_Q, D, G, PG, qk_scale,
                     NUM_SPANS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                     FOLD: tl.constexpr, TMA: tl.constexpr):
    tile = tl.program_id(0)
    grp = tl.program_id(1)
    b = grp // H_KV
    hkv = grp % H_KV
    pair, row, ok, live, qs, qe = _pair_rows(order_ptr, qstart_ptr, qend_ptr, grp, tile, PG, H_Q, H_KV, L_Q, G,
                                             NUM_SPANS, BLOCK_P)
    lo = tl.min(tl.where(live, qs, 1 << 62), axis=0)
    hi = tl.max(tl.where(live, qe, -1), axis=0)
    lo = (lo // BLOCK_N) * BLOCK_N
    qe = tl.where(live, qe, -1)  # a dead pair's range is empty

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = ok[:, None] & dmask[None, :]
    q = tl.load(q_ptr + row[:, None] * D + d[None, :], mask=m2, other=0.0)
    acc = tl.load(wout_ptr + row[:, None] * D + d[None, :], mask=m2, other=0.0)
    m = tl.load(wlse_ptr + row, mask=ok, other=float("-inf")) * LOG2E  # base 2, as window.fwd_step keeps it
    l = tl.where(m > float("-inf"), 1.0, 0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
    m, l, acc = fwd_blocks(q, k_base, v_base, sk_l, sv_l, d, dmask, qs, qe, ok, lo, hi, m, l, acc, qk_scale,
                           k_desc, v_desc, b, hkv, BLOCK_N, BLOCK_D, SPLIT, EVEN_D, PRECISION, FOLD,
                           TMA)  # masks only at the edges of the pairs' spans
    out, lse = fwd_finish(m, l, acc)
    tl.store(bout_ptr + pair[:, None] * D + d[None, :], out, mask=m2)
    tl.store(blse_ptr + pair, lse, mask=ok)


# Forward tuning (module constants, swept by bench/fwd_tune.py): pairs per tile, key block, warps, stages, and
# whether interior blocks (inside every pair's span) skip the masks (the dQ kernel's rule is `window.DQ_SPLIT`).
# The backward keeps its own tiles (`_blocks`).
FWD_BLOCK_P = 64
FWD_BLOCK_N = 64
FWD_WARPS = 4
FWD_STAGES = 2
FWD_SPLIT = True
# Interior key blocks through TMA (`window.fwd_blocks`; compute capability >= 9 only), then with FWD_TMA_STAGES
# stages (112 KB of shared memory: two programs per SM on Hopper; 3 stages without TMA would not fit smaller GPUs).
# H200, session 10 window C (last 32K queries of 1M, with window.FWD_FOLD): 31.01 ms; TMA 31.68; 3 stages 29.97; TMA
# and 3 stages 29.42 (443 TFLOP/s of useful work); whole 1M prefill's span 653.9 -> 598.5 ms.
FWD_TMA = True
FWD_TMA_STAGES = 3


def _blocks(d: int) -> tuple[int, int, int]:
    bd = block_d(d)
    return bd, (64 if bd <= 128 else 32), 64


def span_forward(q2, k, v, qstart, qend, win_out, win_lse):
    """Span branches merged with the window.

    Args:
        q2: [B, H_Q, L_Q, D] contiguous; k, v: [B, H_KV, L_KV, D] (unit stride in D);
        qstart, qend: int32 [B, H_Q, L_Q, K] contiguous; win_out fp32 [B, H_Q, L_Q, D]; win_lse fp32 [B, H_Q, L_Q].
    Returns:
        (branch_out fp32 [B, H_Q, L_Q, K, D], branch_lse fp32 [B, H_Q, L_Q, K], order): O_k and the
        lse of S_k ∪ Wnd; `order` is the pair sort (by the backward's key block), reused by the backward.
    """
    b, h_q, l_q, d = q2.shape
    h_kv, l_kv = k.shape[1], k.shape[2]
    num_spans = qstart.shape[-1]
    group = h_q // h_kv
    bout = torch.empty(b, h_q, l_q, num_spans, d, dtype=torch.float32, device=q2.device)
    blse = torch.empty(b, h_q, l_q, num_spans, dtype=torch.float32, device=q2.device)
    bd, block_n, _ = _blocks(d)
    block_p = FWD_BLOCK_P
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    order = sort_pairs(qstart, qend, h_kv, block_n, l_kv)
    pg = group * l_q * num_spans
    fwd_block_n = FWD_BLOCK_N if bd <= 128 else 32
    k_desc, v_desc, tma = common.tma_descriptors(k, v, fwd_block_n, bd, FWD_TMA)
    _span_fwd_kernel[(triton.cdiv(pg, block_p), b * h_kv)](
        q2, k, v, k_desc, v_desc, order, qstart, qend, win_out, win_lse, bout, blse, *strides,
        h_q, h_kv, l_q, d, group, pg, d ** -0.5 * LOG2E.value,
        NUM_SPANS=num_spans, BLOCK_P=block_p, BLOCK_N=fwd_block_n, BLOCK_D=bd, SPLIT=FWD_SPLIT,
        EVEN_D=bd == d, PRECISION=dot_precision(q2.dtype), FOLD=window.FWD_FOLD, TMA=tma,
        num_warps=FWD_WARPS, num_stages=FWD_TMA_STAGES if tma else FWD_STAGES)
    return bout, blse, order


@triton.jit
def _span_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, order_ptr, qstart_ptr, qend_ptr, do_ptr, gate_ptr, blse_ptr,
                        delta_ptr, dq_ptr,
                        sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                        H_Q, H_KV, L_Q, D, G, PG, qk_scale,
                        NUM_SPANS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                        DOTS: tl.constexpr, SEM: tl.constexpr):
    """dQ2 of a tile of sorted pairs over the union of its spans (`window.dq_blocks`: base 2, masks only at the
    edges of the live pairs' spans with SPLIT); one atomic add per pair row at the end (a row's K pairs and its
    window all add into it). DOTS: instead, each pair's Σ_{j ∈ S_k} P_kj (dO·V_j) (dO
    itself, not g_k dO), stored per pair into fp32 dq_ptr [pairs] — the span part of dO·O_k (grad.branch_dots)."""
    tile = tl.program_id(0)
    grp = tl.program_id(1)
    b = grp // H_KV
    hkv = grp % H_KV
    pair, row, ok, live, qs, qe = _pair_rows(order_ptr, qstart_ptr, qend_ptr, grp, tile, PG, H_Q, H_KV, L_Q, G,
                                             NUM_SPANS, BLOCK_P)
    lo = tl.min(tl.where(live, qs, 1 << 62), axis=0)
    hi = tl.max(tl.where(live, qe, -1), axis=0)
    lo = (lo // BLOCK_N) * BLOCK_N

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = live[:, None] & dmask[None, :]
    q = tl.load(q_ptr + row[:, None] * D + d[None, :], mask=m2, other=0.0)
    do = tl.load(do_ptr + row[:, None] * D + d[None, :], mask=m2, other=0.0)
    if not DOTS:  # dO_k = g_k · dO (docs/algorithm.md §3.2), in the model dtype for the tensor-core products
        gate = tl.load(gate_ptr + pair, mask=live, other=0.0)
        do = gate[:, None] * do.to(tl.float32)
    do = do.to(q.dtype)
    lse2 = tl.load(blse_ptr + pair, mask=live, other=float("inf")) * LOG2E  # +inf: a dead pair gets P = 0
    delta = tl.load(delta_ptr + pair, mask=live, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h

    dq = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dots = tl.zeros([BLOCK_P], tl.float32)
    dq, dots = dq_blocks(q, do, lse2, delta, k_base, v_base, sk_l, sv_l, d, dmask, qs, qe, live, lo, hi, dq, dots,
                         qk_scale, BLOCK_N, SPLIT, DOTS, EVEN_D, PRECISION)
    if DOTS:
        tl.store(dq_ptr + pair, dots, mask=ok)
    else:
        tl.atomic_add(dq_ptr + row[:, None] * D + d[None, :], dq * (qk_scale * LN2), mask=m2, sem=SEM)


@triton.jit
def _span_kv_tile(q_ptr, order_ptr, qstart_ptr, qend_ptr, do_ptr, gate_ptr, blse_ptr, delta_ptr, kk, vv, dk, dv,
                  cols, d, dmask, grp, tile, PG, H_Q, H_KV, L_Q, D, G, scale,
                  NUM_SPANS: tl.constexpr, BLOCK_P: tl.constexpr, SORTED: tl.constexpr, PRECISION: tl.constexpr,
                  EXP2: tl.constexpr):
    """One pair tile's contribution to a key block's (dK / scale, dV): P recomputed from the pairs' lse.
    SORTED: the pair arrays are already in sorted order (`order_ptr` then holds each pair's row), so the tile reads
    them contiguously instead of through the sort."""
    if SORTED:
        r = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = r < PG
        key = grp.to(tl.int64) * PG + r
        row = tl.load(order_ptr + key, mask=ok, other=0)
        qs = tl.load(qstart_ptr + key, mask=ok, other=-1)
        qe = tl.load(qend_ptr + key, mask=ok, other=-1)
        live = ok & (qs >= 0) & (qe >= qs)
    else:
        key, row, ok, live, qs, qe = _pair_rows(order_ptr, qstart_ptr, qend_ptr, grp, tile, PG, H_Q, H_KV, L_Q, G,
                                                NUM_SPANS, BLOCK_P)
    m2 = live[:, None] & dmask[None, :]
    q = tl.load(q_ptr + row[:, None] * D + d[None, :], mask=m2, other=0.0)
    gate = tl.load(gate_ptr + key, mask=live, other=0.0)
    do = gate[:, None] * tl.load(do_ptr + row[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    do = do.to(q.dtype)
    lse = tl.load(blse_ptr + key, mask=live, other=float("inf"))
    delta = tl.load(delta_ptr + key, mask=live, other=0.0)
    allowed = live[None, :] & (cols[:, None] >= qs[None, :]) & (cols[:, None] <= qe[None, :])  # [BLOCK_N, BLOCK_P]
    return kv_grad_step(kk, vv, q, do, lse, delta, allowed, dk, dv, scale, PRECISION, True, EXP2)


@triton.jit
def _span_kv_lean_tile(q_ptr, row_ptr, qstart_ptr, qend_ptr, do_ptr, blse_ptr, delta_ptr, kk, vv, dk, dv,
                       cols, d, dmask, grp, tile, PG, D, scale,
                       BLOCK_P: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, EVEN_P: tl.constexpr,
                       EVEN_D: tl.constexpr):
    """`_span_kv_tile` on the lean pair arrays of `span_backward_kv` (KV_LEAN): in sorted order, with the gate in
    the lse and Δ, lse' = lse − ln g (+inf for a dead pair or g = 0) and Δ' = Δ/g (0 where g = 0), so that
    P' = exp(q·k·scale − lse') = g·P and dS = P'(dO·v − Δ') = P(g dO·v − Δ): the rows' dO is read unscaled and
    liveness needs no per-pair test (a dead pair's row is a real row; its P' is 0). P' with exp2. MASKED = False: the
    key block lies inside every live pair's span (no per-key mask, no span bounds read). EVEN_P: the group's pairs
    fill whole tiles; EVEN_D: D is a power of two >= 16 (no lane mask)."""
    r = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    key = grp.to(tl.int64) * PG + r
    if EVEN_P:
        row = tl.load(row_ptr + key)
        lse = tl.load(blse_ptr + key)
        delta = tl.load(delta_ptr + key)
    else:
        ok = r < PG
        row = tl.load(row_ptr + key, mask=ok, other=0)
        lse = tl.load(blse_ptr + key, mask=ok, other=float("inf"))
        delta = tl.load(delta_ptr + key, mask=ok, other=0.0)
    off = row.to(tl.int64)[:, None] * D + d[None, :]
    if EVEN_D:
        q = tl.load(q_ptr + off)
        do = tl.load(do_ptr + off)
    else:
        q = tl.load(q_ptr + off, mask=dmask[None, :], other=0.0)
        do = tl.load(do_ptr + off, mask=dmask[None, :], other=0.0)
    if MASKED:
        if EVEN_P:
            qs = tl.load(qstart_ptr + key)
            qe = tl.load(qend_ptr + key)
        else:
            qs = tl.load(qstart_ptr + key, mask=r < PG, other=0)
            qe = tl.load(qend_ptr + key, mask=r < PG, other=-1)
        allowed = (cols[:, None] >= qs[None, :]) & (cols[:, None] <= qe[None, :])  # [BLOCK_N, BLOCK_P]
    else:
        allowed = None
    return kv_grad_step(kk, vv, q, do, lse, delta, allowed, dk, dv, scale, PRECISION, MASKED, True)


@triton.jit
def _span_bwd_kv_kernel(q_ptr, k_ptr, v_ptr, order_ptr, qstart_ptr, qend_ptr, do_ptr, gate_ptr, blse_ptr,
                        delta_ptr, tile_lo_ptr, tile_hi_ptr, tile_in_ptr, trange_ptr, dk_ptr, dv_ptr,
                        sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                        H_Q, H_KV, L_Q, L_KV, D, G, PG, N_TILES, N_KB, scale,
                        NUM_SPANS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SKIP: tl.constexpr, SORTED: tl.constexpr,
                        EXP2: tl.constexpr, LEAN: tl.constexpr, EVEN_P: tl.constexpr, EVEN_D: tl.constexpr,
                        INTERIOR: tl.constexpr, NEXT: tl.constexpr):
    """dK, dV of one key block of one KV group, key-major: the program visits the pair tiles whose key range
    [tile_lo, tile_hi] can meet the block (a contiguous run of tiles, `trange`), skips those that do not,
    keeps dK and dV in registers and adds them once to the window's (no atomics: it owns the block).
    LEAN (with SKIP and SORTED): `_span_kv_lean_tile`, and a tile whose live pairs' spans all hold the whole block
    (tile_in_ptr: per tile the largest qstart and smallest qend of its live pairs) runs without the per-key mask
    (with INTERIOR; else every lean visit is masked). NEXT: each trip reads the next tile's key range (and with LEAN
    and INTERIOR its inner range) before this tile's visit, so the branch does not wait for a memory round trip."""
    kb = tl.program_id(0)
    grp = tl.program_id(1)
    b = grp // H_KV
    hkv = grp % H_KV
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    k0 = kb * BLOCK_N
    cols = k0 + tl.arange(0, BLOCK_N)
    kv_mask = (cols < L_KV)[:, None] & dmask[None, :]
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
    kk = tl.load(k_base + cols[:, None].to(tl.int64) * sk_l + d[None, :], mask=kv_mask, other=0.0)
    vv = tl.load(v_base + cols[:, None].to(tl.int64) * sv_l + d[None, :], mask=kv_mask, other=0.0)
    rng = (grp.to(tl.int64) * N_KB + kb) * 2
    t_lo = tl.load(trange_ptr + rng)
    t_hi = tl.load(trange_ptr + rng + 1)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    tb = grp.to(tl.int64) * N_TILES
    if NEXT:  # the first tile's ranges (any tile of the group when the run is empty; then never used)
        at = tl.minimum(t_lo, N_TILES - 1)
        n_lo = tl.load(tile_lo_ptr + tb + at)
        n_hi = tl.load(tile_hi_ptr + tb + at)
        if LEAN & INTERIOR:
            n_in_lo = tl.load(tile_in_ptr + (tb + at) * 2)
            n_in_hi = tl.load(tile_in_ptr + (tb + at) * 2 + 1)
        else:  # not read
            n_in_lo = n_lo
            n_in_hi = n_hi
    for tile in range(t_lo, t_hi):
        if NEXT:
            lo, hi, in_lo, in_hi = n_lo, n_hi, n_in_lo, n_in_hi
            at = tl.minimum(tile + 1, N_TILES - 1)
            n_lo = tl.load(tile_lo_ptr + tb + at)
            n_hi = tl.load(tile_hi_ptr + tb + at)
            if LEAN & INTERIOR:
                n_in_lo = tl.load(tile_in_ptr + (tb + at) * 2)
                n_in_hi = tl.load(tile_in_ptr + (tb + at) * 2 + 1)
        else:
            lo = tl.load(tile_lo_ptr + tb + tile)
            hi = tl.load(tile_hi_ptr + tb + tile)
            if LEAN & INTERIOR:
                in_lo = tl.load(tile_in_ptr + (tb + tile) * 2)
                in_hi = tl.load(tile_in_ptr + (tb + tile) * 2 + 1)
        if LEAN:
            if INTERIOR:
                if (lo < k0 + BLOCK_N) & (hi >= k0):
                    if (in_lo <= k0) & (in_hi >= k0 + BLOCK_N - 1):
                        dk, dv = _span_kv_lean_tile(q_ptr, order_ptr, qstart_ptr, qend_ptr, do_ptr, blse_ptr,
                                                    delta_ptr, kk, vv, dk, dv, cols, d, dmask, grp, tile, PG, D, scale,
                                                    BLOCK_P, PRECISION, False, EVEN_P, EVEN_D)
                    else:
                        dk, dv = _span_kv_lean_tile(q_ptr, order_ptr, qstart_ptr, qend_ptr, do_ptr, blse_ptr,
                                                    delta_ptr, kk, vv, dk, dv, cols, d, dmask, grp, tile, PG, D, scale,
                                                    BLOCK_P, PRECISION, True, EVEN_P, EVEN_D)
            elif (lo < k0 + BLOCK_N) & (hi >= k0):
                dk, dv = _span_kv_lean_tile(q_ptr, order_ptr, qstart_ptr, qend_ptr, do_ptr, blse_ptr, delta_ptr,
                                            kk, vv, dk, dv, cols, d, dmask, grp, tile, PG, D, scale,
                                            BLOCK_P, PRECISION, True, EVEN_P, EVEN_D)
        elif SKIP:
            if (lo < k0 + BLOCK_N) & (hi >= k0):
                dk, dv = _span_kv_tile(q_ptr, order_ptr, qstart_ptr, qend_ptr, do_ptr, gate_ptr, blse_ptr, delta_ptr,
                                       kk, vv, dk, dv, cols, d, dmask, grp, tile, PG, H_Q, H_KV, L_Q, D, G, scale,
                                       NUM_SPANS, BLOCK_P, SORTED, PRECISION, EXP2)
        else:  # tiles that miss the block are computed under the masks (no branch in the loop)
            dk, dv = _span_kv_tile(q_ptr, order_ptr, qstart_ptr, qend_ptr, do_ptr, gate_ptr, blse_ptr, delta_ptr,
                                   kk, vv, dk, dv, cols, d, dmask, grp, tile, PG, H_Q, H_KV, L_Q, D, G, scale,
                                   NUM_SPANS, BLOCK_P, SORTED, PRECISION, EXP2)
    off = (grp.to(tl.int64) * L_KV + cols[:, None]) * D + d[None, :]  # dk/dv: contiguous fp32 [B, H_KV, L_KV, D]
    tl.store(dk_ptr + off, tl.load(dk_ptr + off, mask=kv_mask, other=0.0) + dk * scale, mask=kv_mask)
    tl.store(dv_ptr + off, tl.load(dv_ptr + off, mask=kv_mask, other=0.0) + dv, mask=kv_mask)


def tile_key_ranges(qs, qe, block_p: int, l_kv: int, block_n: int, inner: bool = False):
    """Per pair tile (BLOCK_P consecutive sorted pairs of a group): the key range [lo, hi] of its live pairs
    (lo = 2^62, hi = -1 for a tile without one), int64 [n_groups, n_tiles] each; and per key block the run
    [first, last) of tiles that can meet it, int64 [n_groups, n_blocks, 2]. A tile before `first` ends before
    the block (prefix maximum of hi), a tile from `last` on starts after it (suffix minimum of lo), whatever
    the sort order; sorting only keeps the run short. qs, qe: the pairs' span bounds in sorted order,
    [n_groups, pairs per group]. With `inner`, also per tile the keys [in_lo, in_hi] inside every live pair's span
    (the largest qstart, the smallest qend; -1 and 2^62 for a tile without a live pair), int64
    [n_groups, n_tiles, 2], as a fourth result. Device tensors only, no host sync."""
    n_groups, pg = qs.shape
    n_tiles = -(-pg // block_p)
    qs, qe = qs.long(), qe.long()
    live = (qs >= 0) & (qe >= qs)
    pad = n_tiles * block_p - pg
    lo = torch.nn.functional.pad(torch.where(live, qs, torch.full_like(qs, 1 << 62)), (0, pad), value=1 << 62)
    hi = torch.nn.functional.pad(torch.where(live, qe, torch.full_like(qe, -1)), (0, pad), value=-1)
    lo = lo.view(n_groups, n_tiles, block_p).amin(-1).contiguous()
    hi = hi.view(n_groups, n_tiles, block_p).amax(-1).contiguous()
    reach = torch.cummax(hi, dim=1).values.contiguous()
    floor = torch.cummin(lo.flip(1), dim=1).values.flip(1).contiguous()
    first_key = torch.arange(0, l_kv, block_n, device=qs.device).expand(n_groups, -1).contiguous()
    first = torch.searchsorted(reach, first_key, right=False)
    last = torch.searchsorted(floor, first_key + block_n - 1, right=True)
    ranges = torch.stack([first, last], dim=-1).contiguous()
    if not inner:
        return lo, hi, ranges
    in_lo = torch.nn.functional.pad(torch.where(live, qs, torch.full_like(qs, -1)), (0, pad), value=-1)
    in_hi = torch.nn.functional.pad(torch.where(live, qe, torch.full_like(qe, 1 << 62)), (0, pad), value=1 << 62)
    inside = torch.stack([in_lo.view(n_groups, n_tiles, block_p).amax(-1),
                          in_hi.view(n_groups, n_tiles, block_p).amin(-1)], dim=-1).contiguous()
    return lo, hi, ranges, inside


KV_TILE = 64  # sorted pairs per tile visited by the key-major kernel (independent of the dQ kernel's tiles)
KV_SKIP = True  # branch over tiles of the run that miss the block (else they are computed fully masked)
KV_SORTED = True  # the key-major kernel reads the pair arrays gathered into sorted order (else through the sort)
# The key-major kernel's lean visits (`_span_kv_lean_tile`, with KV_SKIP and KV_SORTED): the gate folded into the
# sorted lse and Δ (lse − ln g, Δ/g; dead pairs' lse +inf), so a visit reads no gate, tests no liveness and scales no
# dO; exp2; no per-key mask where the block lies inside every live pair's span of the tile. Session 9, sm_90 SASS
# (Triton 3.6, 128 keys x 64 pairs, 8 warps): a visit from ~1,087 instructions per thread (exp2) to ~414 (inside every
# span) or ~492 (masked). Session 9 (H200): in 128-key 8-warp programs slower than the plain visits (span dK/dV at
# 128K 105.0 vs 94.1 ms; first form 110.1), in 64-key 4-warp programs (`KV_BLOCK_N`, `KV_WARPS`) the fastest measured
# (85.3 ms). On since session 10 together with those programs, every visit masked (`KV_INTERIOR = False`): H200
# window C, backward alone at 128K 179.4 ms (session 9's plain 128 x 8) -> 177.4 (lean 64 x 4) -> 172.7 (all masked;
# span dK/dV 89.0 -> 84.9 -> 80.0); window D, train step vs session 9's, same process: 128K 232.3 -> 224.9-229.2 ms,
# 256K 605.7 -> 592.3-592.7, 32K 41.5 -> 39.1-39.2, 64K 93.9 -> 91.3-91.8. Checks: gpu_check grads (window A, lean
# 64 x 4: both presets bf16/fp16, release fp32, recompute, 40K chunks 47/47; window D, all masked: release bf16,
# recompute, chunks 17/17; session 9 window C, all masked: both presets bf16/fp16 41/41). bench/BENCHMARKS.md
# "H200, session 10: training kernels".
KV_LEAN = True
# Lean visits of a block inside every live span of the tile skip the per-key mask (True) or every visit is masked
# (False, the default: the branch between the two visit bodies cost more than the masks it saved, see KV_LEAN).
KV_INTERIOR = False
# Each trip of the key-major loop reads the next tile's key range ahead (scalars only), so the meet test does not wait
# for a memory round trip. H200, session 9 window B: backward alone at 128K 187.2 -> 182.5 ms (span dK/dV 94.1 ->
# 89.5), train step 128K 247.7 -> 244.6 ms, 64K 99.8 -> 97.9, 32K 44.3 -> 43.5; gpu_check grads 41/41.
KV_NEXT = True
# Keys and warps per program of the span dK/dV kernel (None: the window's, `window.KV_BLOCK` / `KV_WARPS`). 64 keys
# at 4 warps: two programs per SM (255 registers x 128 threads each) instead of one of 8 warps; with the plain visits
# slower (134.7 ms at 128K), with the lean ones faster (see KV_LEAN).
KV_BLOCK_N = 64
KV_WARPS = 4
DQ_BLOCK_N = 64  # keys per loop trip of the dQ kernel (D <= 128; 32 above)
DQ_STAGES = 2
DQ_WARPS = 4  # warps of the dQ kernel


def span_backward_dq(q2, k, v, qstart, qend, order, do, gate, branch_lse, delta, dq, dots: bool = False) -> None:
    """Span part of dQ2, added into fp32 dq [B, H_Q, L_Q, D] (contiguous; the window stored it): pair tiles over
    the union of their spans, one atomic add per pair row. P is recomputed from the stored lse.

    q2 [B, H_Q, L_Q, D] contiguous; do like q2; qstart, qend int32 and gate, branch_lse, delta fp32
    [B, H_Q, L_Q, K] (delta_k = rowsum(dO_k ∘ O_k)); `order`: the pair sort of these pairs (or None: sorted here).
    With `dots`: the span part of dO·O_k instead, Σ_{j ∈ S_k} P_kj (dO·V_j), *stored* into fp32 dq [B, H_Q, L_Q, K]
    (gate and delta unused).
    """
    b, h_q, l_q, d = q2.shape
    h_kv, l_kv = k.shape[1], k.shape[2]
    num_spans = qstart.shape[-1]
    group = h_q // h_kv
    bd, block_n, block_p = _blocks(d)
    if order is None:
        order = sort_pairs(qstart, qend, h_kv, block_n, l_kv)
    pg = group * l_q * num_spans
    _span_bwd_dq_kernel[(triton.cdiv(pg, block_p), b * h_kv)](
        q2, k, v, order, qstart, qend, do, gate, branch_lse, delta, dq,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h_q, h_kv, l_q, d, group, pg, d ** -0.5 * LOG2E.value,
        NUM_SPANS=num_spans, BLOCK_P=block_p, BLOCK_N=min(block_n, DQ_BLOCK_N), BLOCK_D=bd, SPLIT=window.DQ_SPLIT,
        EVEN_D=bd == d, PRECISION=dot_precision(q2.dtype), DOTS=dots, SEM=common.GRAD_ATOMIC_SEM, num_warps=DQ_WARPS,
        num_stages=DQ_STAGES)


def span_backward_kv(q2, k, v, qstart, qend, order, do, gate, branch_lse, delta, dk, dv) -> None:
    """Span part of dK, dV, added into fp32 dk, dv [B, H_KV, L_KV, D] (contiguous; the window stored them).
    Key-major (`_span_bwd_kv_kernel`): no atomics. Arguments as `span_backward_dq`, over all of the call's pairs.
    """
    b, h_q, l_q, d = q2.shape
    h_kv, l_kv = k.shape[1], k.shape[2]
    num_spans = qstart.shape[-1]
    group = h_q // h_kv
    bd, block_n, _ = _blocks(d)
    if order is None:
        order = sort_pairs(qstart, qend, h_kv, block_n, l_kv)
    pg = group * l_q * num_spans
    n_groups = b * h_kv
    pairs = (order, qstart, qend, gate, branch_lse, delta)
    sqs, sqe = (x.reshape(-1)[order] for x in (qstart, qend))
    lean = KV_LEAN and KV_SKIP and KV_SORTED
    block_n = KV_BLOCK_N or window.KV_BLOCK
    tile_lo, tile_hi, ranges, *inside = tile_key_ranges(sqs.view(n_groups, pg), sqe.view(n_groups, pg), KV_TILE,
                                                        l_kv, block_n, inner=lean)
    if KV_SORTED:
        sgate, slse, sdelta = (x.reshape(-1)[order] for x in (gate, branch_lse, delta))
        if lean:  # the gate into lse and Δ (`_span_kv_lean_tile`); a dead pair's P' is 0 through its lse
            on = (sqs >= 0) & (sqe >= sqs) & (sgate > 0)
            slse = torch.where(on, slse - torch.log(torch.where(on, sgate, 1.0)), float("inf"))
            sdelta = torch.where(on, sdelta / torch.where(on, sgate, 1.0), 0.0)
        pairs = (order // num_spans, sqs, sqe, sgate, slse, sdelta)
    del sqs, sqe
    n_kb = triton.cdiv(l_kv, block_n)
    srow, sqs, sqe, sgate, slse, sdelta = pairs
    _span_bwd_kv_kernel[(n_kb, n_groups)](
        q2, k, v, srow, sqs, sqe, do, sgate, slse, sdelta, tile_lo, tile_hi, inside[0] if lean else tile_lo, ranges,
        dk, dv, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        h_q, h_kv, l_q, l_kv, d, group, pg, tile_lo.shape[1], n_kb, d ** -0.5,
        NUM_SPANS=num_spans, BLOCK_P=KV_TILE, BLOCK_N=block_n, BLOCK_D=bd, PRECISION=dot_precision(q2.dtype),
        SKIP=KV_SKIP, SORTED=KV_SORTED, EXP2=window.KV_EXP2, LEAN=lean, EVEN_P=pg % KV_TILE == 0, EVEN_D=bd == d,
        INTERIOR=KV_INTERIOR, NEXT=KV_NEXT,
        num_warps=KV_WARPS or (window.KV_WARPS if bd >= 128 else 4), num_stages=window.KV_STAGES)
