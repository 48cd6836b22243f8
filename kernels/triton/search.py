"""Span search kernels (docs/algorithm.md §2): raw <Q1, K(anchor)> over the stripes σ+1 … M(q+1), top-K with the
tie rule, span bounds from the shared tables — and the backward through `values` (docs/algorithm.md §2.6).

Forward: one program per (batch, KV head, head chunk, block of BQ queries). It holds Q1 of its
queries x the group's heads as one [BQ, GH, D] tile. Each loop trip takes SC stripes at once: one
gather of the BQ x SC anchor rows of K (each loaded once and shared by every head of the group), then
a batched tl.dot [BQ: GH x D]·[BQ: D x SC] with fp32 accumulation. The loop bound is the block's own
max M(q + 1), loaded from a device tensor: cost follows the current position (Decision D3 in docs/design.md), no
recompile per length. The top-K is a [BQ, GH, KP] register tile (KP = K padded to a power of two, any
K): each trip merges its scores into it by K rounds of "highest score, then earliest anchor" (docs/algorithm.md §2.3).
The Triton backend limits K to `common.MAX_SPANS` (docs/algorithm.md §1.2); the code itself has no fixed K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import block_d, dot_precision, gdc_launch_dependents, gdc_wait, max_stripes, next_pow2, pdl_launch
from .rules import window_lo


@triton.jit
def _merge_top(top_v, top_a, score, anchor, slot, NUM_SPANS: tl.constexpr, AXIS: tl.constexpr):
    """The best NUM_SPANS of (current slots, new candidates): score descending, then anchor ascending.

    top_v/top_a [..., KP] hold the slots along the last axis AXIS (KP = NUM_SPANS padded to a power of two;
    slot = arange(KP) broadcast to that shape; unused slots are -inf / -1); score/anchor [..., C] are the
    new candidates (-inf where not a candidate). Anchors are distinct positions, so "earliest anchor among
    equal scores" is the tie rule (docs/algorithm.md §2.3) whatever order the candidates came in. Returns (top_v, top_a).
    """
    new_v = tl.full(top_v.shape, float("-inf"), tl.float32)
    new_a = tl.full(top_a.shape, -1, tl.int64)
    for r in tl.static_range(NUM_SPANS):
        best = tl.maximum(tl.max(score, axis=AXIS), tl.max(top_v, axis=AXIS))
        best_x = tl.expand_dims(best, AXIS)
        pick = tl.minimum(tl.min(tl.where(score == best_x, anchor, 1 << 62), axis=AXIS),
                          tl.min(tl.where(top_v == best_x, top_a, 1 << 62), axis=AXIS))
        pick_x = tl.expand_dims(tl.where(best > float("-inf"), pick, -1), AXIS)
        new_v = tl.where(slot == r, best_x, new_v)
        new_a = tl.where(slot == r, pick_x, new_a)
        score = tl.where(anchor == pick_x, float("-inf"), score)
        top_v = tl.where(top_a == pick_x, float("-inf"), top_v)
    return new_v, new_a


KEY_NONE = tl.constexpr(-9223372036854775807)  # below every candidate's key: an empty slot


@triton.jit
def _slot_key(score, anchor):
    """One int64 per candidate, ordered as (score descending, then anchor ascending) — the tie rule of
    docs/algorithm.md §2.3 in a single comparison: the float's bits made monotone (−0 counted as +0) in the high
    word, 2^31 − 1 − anchor in the low word. −inf and NaN scores (never picked) get KEY_NONE."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - anchor).to(tl.int64)
    return tl.where(score > float("-inf"), key, KEY_NONE)


@triton.jit
def _key_slot(key):
    """(score, anchor) of `_slot_key`'s keys; (−inf, −1) for KEY_NONE."""
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    valid = key != KEY_NONE
    score = tl.where(valid, bits.to(tl.float32, bitcast=True), float("-inf"))
    anchor = tl.where(valid, 0x7FFFFFFF - (key & 0xFFFFFFFF), -1)
    return score, anchor


@triton.jit
def _merge_top_keyed(top, key, slot, NUM_SPANS: tl.constexpr, AXIS: tl.constexpr):
    """`_merge_top` on `_slot_key` keys: the NUM_SPANS largest of (current slots, new candidates), one max per
    round (keys are distinct: anchors are)."""
    new = tl.full(top.shape, KEY_NONE, tl.int64)
    for r in tl.static_range(NUM_SPANS):
        best = tl.expand_dims(tl.maximum(tl.max(key, axis=AXIS), tl.max(top, axis=AXIS)), AXIS)
        new = tl.where(slot == r, best, new)
        key = tl.where(key == best, KEY_NONE, key)
        top = tl.where(top == best, KEY_NONE, top)
    return new


@triton.jit
def _insert_ordered(x, xs, v0, s0, v1, s1, v2, s2, v3, s3, NUM_SPANS: tl.constexpr):
    """Insert one candidate (score x, stripe xs; [rows]) into the running slots v0 >= v1 >= ... (their stripes s0, s1,
    ...; -inf / -1 when empty) of the first NUM_SPANS <= 4 slots. Every slot holds an earlier anchor than x, so x
    displaces a slot only with a strictly higher score (the tie rule of docs/algorithm.md §2.3); -inf never enters."""
    # Slots are sorted, so x beats a suffix of them: c_k = x > v_k (old values); slot k takes x where x beats k but
    # not k - 1, the old slot k - 1 where x beats k - 1, else keeps its own.
    c0 = x > v0
    if NUM_SPANS > 3:
        c3 = x > v3
        c2 = x > v2
        v3 = tl.where(c2, v2, tl.where(c3, x, v3))
        s3 = tl.where(c2, s2, tl.where(c3, xs, s3))
    if NUM_SPANS > 2:
        c2 = x > v2
        c1 = x > v1
        v2 = tl.where(c1, v1, tl.where(c2, x, v2))
        s2 = tl.where(c1, s1, tl.where(c2, xs, s2))
    if NUM_SPANS > 1:
        c1 = x > v1
        v1 = tl.where(c0, v0, tl.where(c1, x, v1))
        s1 = tl.where(c0, s0, tl.where(c1, xs, s1))
    v0 = tl.where(c0, x, v0)
    s0 = tl.where(c0, xs, s0)
    return v0, s0, v1, s1, v2, s2, v3, s3


@triton.jit
def _span_lengths(t, ok, L_KV, blen_ptr, flen_ptr):
    """B(t) and Fw(t) from the tables (0 where not `ok`); they end at L_KV (a decode position beyond the cache is not
    read on the host)."""
    inside = t <= L_KV
    return tl.load(blen_ptr + t, mask=ok & inside, other=0), tl.load(flen_ptr + t, mask=ok & inside, other=0)


@triton.jit
def _store_slots(top_v, top_a, pos, s, back, fwd, off, ok, L_KV, W,
                 qstart_ptr, qanchor_ptr, qend_ptr, values_ptr):
    """Write the slots (all arguments broadcast to the slots' shape; `off` = row * NUM_SPANS + slot, `ok`
    false on padding slots): span bounds of docs/algorithm.md §1.7 from B(t) and Fw(t) (`_span_lengths`)."""
    valid = top_a >= 0
    qs = tl.maximum(tl.maximum(top_a - back, s), 0)
    qe = tl.minimum(tl.minimum(top_a + fwd, pos), L_KV - 1)
    qe = tl.where(W > 0, tl.minimum(qe, window_lo(pos, 0, W) - 1), qe)
    qs = tl.where(valid, qs, -1)
    qe = tl.where(valid, qe, -1)
    tl.store(qstart_ptr + off, qs.to(tl.int32), mask=ok)
    tl.store(qanchor_ptr + off, top_a.to(tl.int32), mask=ok)
    tl.store(qend_ptr + off, qe.to(tl.int32), mask=ok)
    tl.store(values_ptr + off, top_v, mask=ok)


@triton.jit
def _search_kernel(q1_ptr, k_ptr, pos_ptr, start_ptr, mstripe_ptr, table_ptr, blen_ptr, flen_ptr,
                   qstart_ptr, qanchor_ptr, qend_ptr, values_ptr, part_v_ptr, part_a_ptr,
                   sk_b, sk_h, sk_l,
                   H_Q, H_KV, L_Q, L_KV, D, G, N_CHUNKS, SIGMA, W, SPLIT, N_SPLIT, I_MAX,
                   NUM_SPANS: tl.constexpr, KP: tl.constexpr, GH: tl.constexpr, BQ: tl.constexpr,
                   SC: tl.constexpr, BLOCK_D: tl.constexpr, IS_SPLIT: tl.constexpr, FIXED_TOP: tl.constexpr,
                   KEYED: tl.constexpr, ORDERED: tl.constexpr, PRECISION: tl.constexpr,
                   PDL: tl.constexpr):
    if PDL:  # programmatic dependent launch (decode): wait for the previous kernel, let the next one launch
        gdc_wait()
        gdc_launch_dependents()
    pid_q = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_s = tl.program_id(2)  # which run of SPLIT stripes (decode); 0 with one run per query block
    chunk = pid_g % N_CHUNKS
    bh = pid_g // N_CHUNKS
    b = bh // H_KV
    hkv = bh % H_KV
    g = chunk * GH + tl.arange(0, GH)
    qi = pid_q * BQ + tl.arange(0, BQ)
    q_ok = qi < L_Q
    ok = q_ok[:, None] & (g < G)[None, :]  # [BQ, GH]
    base = qi[:, None] + ((b * H_Q + hkv * G + g).to(tl.int64) * L_Q)[None, :]  # row in [B, H_Q, L_Q]

    pos = tl.load(pos_ptr + qi, mask=q_ok, other=0)  # [BQ]
    s = tl.load(start_ptr + b)
    if FIXED_TOP:  # decode: runs past the position's own M(q + 1) find only negative anchors and load nothing
        i_top = I_MAX
    else:
        i_top = tl.max(tl.load(mstripe_ptr + qi, mask=q_ok, other=0), axis=0)

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q1_ptr + base[:, :, None] * D + d[None, None, :],
                mask=ok[:, :, None] & dmask[None, None, :], other=0.0)  # [BQ, GH, BLOCK_D]
    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    col = tl.arange(0, SC)

    slot = tl.arange(0, KP)[None, None, :]  # [1, 1, KP]
    top_v = tl.full([BQ, GH, KP], float("-inf"), tl.float32)
    top_a = tl.full([BQ, GH, KP], -1, tl.int64)
    top_key = tl.full([BQ, GH, KP], KEY_NONE, tl.int64)
    if ORDERED:  # the running top-K as NUM_SPANS <= 4 named slots (score, stripe index), best first
        v0 = tl.full([BQ, GH], float("-inf"), tl.float32)
        s0 = tl.full([BQ, GH], -1, tl.int32)
        v1 = v0
        s1 = s0
        v2 = v0
        s2 = s0
        v3 = v0
        s3 = s0
        col3 = col[None, None, :]
        pos32 = pos.to(tl.int32)
        s32 = s.to(tl.int32)
    i_hi = tl.minimum(i_top, SIGMA + (pid_s + 1) * SPLIT)
    n = i_hi - SIGMA - pid_s * SPLIT
    for j0 in range(0, n, SC):
        # SC stripes per trip, largest index (earliest anchor) in column 0.
        if ORDERED:  # anchors in int32 (positions fit: L_KV < 2^31, checked by the backend); only offsets int64
            col_ok = j0 + col < n
            offset = tl.load(table_ptr + (i_hi - j0 - col), mask=col_ok, other=0).to(tl.int32)  # [SC]
            anchor = pos32[:, None] + 1 - offset[None, :]  # [BQ, SC]
            cand = q_ok[:, None] & col_ok[None, :] & (anchor >= s32) & (anchor >= 0) & (anchor < L_KV)
            rows = anchor.to(tl.int64)
        else:
            offset = tl.load(table_ptr + (i_hi - j0 - col), mask=j0 + col < n, other=1 << 62)  # [SC]
            anchor = pos[:, None] + 1 - offset[None, :]  # [BQ, SC]; masked columns are negative
            cand = q_ok[:, None] & (anchor >= s) & (anchor >= 0) & (anchor < L_KV)
            rows = anchor
        # One gather of BQ x SC key rows; each is shared by all heads of the group.
        kt = tl.load(k_base + rows[:, None, :] * sk_l + d[None, :, None],
                     mask=cand[:, None, :] & dmask[None, :, None], other=0.0)  # [BQ, BLOCK_D, SC]
        score = tl.dot(q, kt, input_precision=PRECISION)  # [BQ, GH, SC], fp32 accumulation, no 1/sqrt(D)
        if ORDERED:
            # Anchors grow with the column and from trip to trip, so "earliest anchor among equal scores" is "first
            # seen": the trip's best NUM_SPANS in order (first column on ties), each inserted into the running slots
            # with a strict >. Only fp32 maxima and int32 column minima; NaN scores are never picked.
            x = tl.where(cand[:, None, :] & (score == score), score, float("-inf"))
            first = (i_hi - j0).to(tl.int32)  # stripe index of column 0
            for _ in tl.static_range(NUM_SPANS):
                best = tl.max(x, axis=2)  # [BQ, GH]
                pick = tl.min(tl.where(x == best[:, :, None], col3, SC), axis=2)
                x = tl.where(col3 == pick[:, :, None], float("-inf"), x)
                v0, s0, v1, s1, v2, s2, v3, s3 = _insert_ordered(best, first - pick, v0, s0, v1, s1, v2, s2, v3, s3,
                                                                 NUM_SPANS)
        else:
            score = tl.where(cand[:, None, :], score, float("-inf"))
            anchor3 = tl.broadcast_to(anchor[:, None, :], [BQ, GH, SC])
            if KEYED:
                top_key = _merge_top_keyed(top_key, _slot_key(score, anchor3), slot, NUM_SPANS, 2)
            else:
                top_v, top_a = _merge_top(top_v, top_a, score, anchor3, slot, NUM_SPANS, 2)
    if ORDERED:
        top_v = tl.where(slot == 0, v0[:, :, None], top_v)
        top_s = tl.where(slot == 0, s0[:, :, None], -1)
        if NUM_SPANS > 1:
            top_v = tl.where(slot == 1, v1[:, :, None], top_v)
            top_s = tl.where(slot == 1, s1[:, :, None], top_s)
        if NUM_SPANS > 2:
            top_v = tl.where(slot == 2, v2[:, :, None], top_v)
            top_s = tl.where(slot == 2, s2[:, :, None], top_s)
        if NUM_SPANS > 3:
            top_v = tl.where(slot == 3, v3[:, :, None], top_v)
            top_s = tl.where(slot == 3, s3[:, :, None], top_s)
        picked = top_s >= 0
        offset = tl.load(table_ptr + top_s, mask=picked, other=0)
        top_a = tl.where(picked, pos[:, None, None] + 1 - offset, -1)
    elif KEYED:
        top_v, top_a = _key_slot(top_key)

    in_k = ok[:, :, None] & (slot < NUM_SPANS)
    if IS_SPLIT:
        # Partial top-K of this run of stripes; _search_merge_kernel picks the final top-K.
        part = (base[:, :, None] * N_SPLIT + pid_s) * NUM_SPANS + slot
        tl.store(part_v_ptr + part, top_v, mask=in_k)
        tl.store(part_a_ptr + part, top_a, mask=in_k)
    else:
        pos3 = tl.broadcast_to(pos[:, None, None], [BQ, GH, KP])
        back, fwd = _span_lengths(tl.maximum(pos3 + 1 - s, 0), in_k, L_KV, blen_ptr, flen_ptr)
        _store_slots(top_v, top_a, pos3, s, back, fwd, base[:, :, None] * NUM_SPANS + slot, in_k,
                     L_KV, W, qstart_ptr, qanchor_ptr, qend_ptr, values_ptr)


@triton.jit
def _search_merge_kernel(part_v_ptr, part_a_ptr, pos_ptr, start_ptr, blen_ptr, flen_ptr,
                         qstart_ptr, qanchor_ptr, qend_ptr, values_ptr,
                         H_Q, L_Q, L_KV, W, N_ROWS, N_PART,
                         NUM_SPANS: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         PDL: tl.constexpr):
    """Final top-K over the partial top-K lists of all stripe runs: score descending, then anchor
    ascending (the tie rule; anchors of different stripes are distinct, so the order is total)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ok = rows < N_ROWS
    c = tl.arange(0, BLOCK_C)
    m2 = ok[:, None] & (c < N_PART)[None, :]
    qi = rows % L_Q
    b = rows // (H_Q * L_Q)
    pos = tl.load(pos_ptr + qi, mask=ok, other=0)
    s = tl.load(start_ptr + b, mask=ok, other=0)
    # B(t), Fw(t) depend on the row only: read them before (not after) the merge, one memory round trip less.
    back, fwd = _span_lengths(tl.maximum(pos + 1 - s, 0), ok, L_KV, blen_ptr, flen_ptr)
    vals = tl.load(part_v_ptr + rows[:, None] * N_PART + c[None, :], mask=m2, other=float("-inf"))
    anch = tl.load(part_a_ptr + rows[:, None] * N_PART + c[None, :], mask=m2, other=-1)
    vals = tl.where(anch >= 0, vals, float("-inf"))
    slot = tl.arange(0, KP)[None, :]
    top_v = tl.full([BLOCK_R, KP], float("-inf"), tl.float32)
    top_a = tl.full([BLOCK_R, KP], -1, tl.int64)
    top_v, top_a = _merge_top(top_v, top_a, vals, anch, slot, NUM_SPANS, 1)
    pos2 = tl.broadcast_to(pos[:, None], [BLOCK_R, KP])
    s2 = tl.broadcast_to(s[:, None], [BLOCK_R, KP])
    _store_slots(top_v, top_a, pos2, s2, tl.broadcast_to(back[:, None], [BLOCK_R, KP]),
                 tl.broadcast_to(fwd[:, None], [BLOCK_R, KP]), rows[:, None] * NUM_SPANS + slot,
                 ok[:, None] & (slot < NUM_SPANS), L_KV, W,
                 qstart_ptr, qanchor_ptr, qend_ptr, values_ptr)


SEARCH_STRIPES = 16  # stripes per loop trip (the N of the batched tl.dot)
SEARCH_TILE_BYTES = 32768  # bytes of the [queries x heads x D] Q1 tile a program keeps in registers
SEARCH_WARPS = 4  # warps of a prefill search program
SEARCH_KEYED = True  # the running top-K as one int64 key per slot (`_slot_key`), one max per round
# Prefill with K <= 4 (`_insert_ordered` has four slots): the running top-K as named fp32 slots filled in anchor order
# (`_insert_ordered`): each trip's best K by fp32 maxima, inserted with a strict >. The int64 keyed merge it replaces
# is ~1,640 SASS instructions per trip of 16 stripes (ISETP/SEL pairs; Triton 3.6, sm_90a), the search's bound.
# H200, session 10 window C (last 32K queries of 1M, routing identical): keyed 13.50 ms, ordered 11.31 ms; whole 1M
# prefill's search 304.8 -> 252.5 ms.
# Tried in the same run and removed (session 11): a round after the first only where some row of the program needs it
# (a block-wide reduction per round), 13.26 ms: the reductions' barriers cost more than the rounds they skip.
SEARCH_ORDERED = True


def search_layout(group: int, l_q: int, d: int, itemsize: int) -> tuple[int, int, int]:
    """(GH heads, BQ queries, head chunks) of a search program: the heads of a KV group, padded to 16
    (the M of tl.dot) or cut into chunks of 16, times as many queries as fit the register tile."""
    gh = 16
    bq = max(1, min(SEARCH_TILE_BYTES // (gh * block_d(d) * itemsize), next_pow2(l_q)))
    return gh, bq, -(-group // gh)


# Decode (L_Q = 1) has one program per KV head: it splits the stripe list into about DECODE_RUNS runs of
# at least DECODE_SPLIT stripes, one program each, and merges their partial top-K lists (docs/algorithm.md §2.7,
# steps 3-4). Few runs keep the merge small; a run of up to DECODE_STRIPES stripes is one gather.
DECODE_SPLIT = 16
DECODE_RUNS = 32
DECODE_STRIPES = 64


def search_forward(q1: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, row_start: torch.Tensor,
                   tables, sw_index: int, window: int, num_spans: int, pdl: bool = False):
    """Launch the search.

    Args:
        q1: [B, H_Q, L_Q, D] contiguous; k: [B, H_KV, L_KV, D] with unit stride in D.
        positions: int64 [L_Q]; row_start: int64 [B]; tables: (offsets, B[t], Fw[t]) int64, sized by L_KV.
    Returns:
        qstart, qanchor, qend (int32) and values (fp32), each [B, H_Q, L_Q, K].

    With L_Q = 1 the stripes σ+1 … M(L_KV) are split into static runs of DECODE_SPLIT (a fixed grid
    for CUDA graphs); runs beyond the query's own M(q + 1) do no loads, so the cost follows q (D3).
    pdl: launch both kernels with programmatic dependent launch (`common.pdl_launch`; decode only).
    """
    b, h_q, l_q, d = q1.shape
    h_kv, l_kv = k.shape[1], k.shape[2]
    group = h_q // h_kv
    offsets, backward, forward = tables
    shape = (b, h_q, l_q, num_spans)
    dev = q1.device
    qstart = torch.empty(shape, dtype=torch.int32, device=dev)
    qanchor = torch.empty(shape, dtype=torch.int32, device=dev)
    qend = torch.empty(shape, dtype=torch.int32, device=dev)
    values = torch.empty(shape, dtype=torch.float32, device=dev)
    gh, bq, n_chunks = search_layout(group, l_q, d, q1.element_size())
    n_stripes = max(offsets.numel() - 2 - sw_index, 0)  # σ+1 … M(L_KV)
    split = l_q == 1 and n_stripes > DECODE_SPLIT
    run = max(DECODE_SPLIT, triton.cdiv(n_stripes, DECODE_RUNS)) if split else max(n_stripes, 1)
    n_split = triton.cdiv(max(n_stripes, 1), run)
    stripes_per_trip = min(DECODE_STRIPES, max(SEARCH_STRIPES, next_pow2(run))) if l_q == 1 else SEARCH_STRIPES
    n_rows = b * h_q * l_q
    if split:
        part_v = torch.empty(n_rows * n_split * num_spans, dtype=torch.float32, device=dev)
        part_a = torch.empty(n_rows * n_split * num_spans, dtype=torch.int64, device=dev)
    else:
        part_v, part_a = values, qanchor  # unused
    grid = (triton.cdiv(l_q, bq), b * h_kv * n_chunks, n_split)
    # Decode skips the M(q + 1) lookup (one launch less per step): the loop bound is M(L_KV) and the
    # candidate test drops the stripes beyond the position.
    mstripe = positions if l_q == 1 else max_stripes(offsets, positions)
    _search_kernel[grid](
        q1, k, positions, row_start, mstripe, offsets, backward, forward,
        qstart, qanchor, qend, values, part_v, part_a,
        k.stride(0), k.stride(1), k.stride(2),
        h_q, h_kv, l_q, l_kv, d, group, n_chunks, sw_index, window, run, n_split, offsets.numel() - 2,
        NUM_SPANS=num_spans, KP=next_pow2(num_spans), GH=gh, BQ=bq, SC=stripes_per_trip, BLOCK_D=block_d(d), IS_SPLIT=split,
        FIXED_TOP=l_q == 1, KEYED=SEARCH_KEYED and not split, ORDERED=SEARCH_ORDERED and not split and num_spans <= 4,
        PRECISION=dot_precision(q1.dtype), PDL=pdl,
        num_warps=4 if l_q == 1 else SEARCH_WARPS, **pdl_launch(pdl))
    if split:
        block_r = 4
        _search_merge_kernel[(triton.cdiv(n_rows, block_r),)](
            part_v, part_a, positions, row_start, backward, forward, qstart, qanchor, qend, values,
            h_q, l_q, l_kv, window, n_rows, n_split * num_spans,
            NUM_SPANS=num_spans, KP=next_pow2(num_spans), BLOCK_R=block_r,
            BLOCK_C=max(16, next_pow2(n_split * num_spans)), PDL=pdl, num_warps=4, **pdl_launch(pdl))
    return qstart, qanchor, qend, values


@triton.jit
def _search_bwd_kernel(q1_ptr, k_ptr, anchor_ptr, dval_ptr, dq1_ptr, dk_ptr,
                       sk_b, sk_h, sk_l, H_Q, H_KV, L_Q, L_KV, D, G, N_ROWS,
                       NUM_SPANS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SEM: tl.constexpr):
    """dQ1(q) = Σ_k u_k K(a_k); dK(a_k) += u_k Q1(q) (atomic scatter: sums over the GQA group; SEM its memory order,
    `common.GRAD_ATOMIC_SEM`)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N_ROWS
    rows64 = rows.to(tl.int64)
    bh = rows64 // L_Q
    b = bh // H_Q
    hkv = (bh % H_Q) // G
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = ok[:, None] & dmask[None, :]
    q = tl.load(q1_ptr + rows64[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    k_row = b * sk_b + hkv * sk_h
    dk_row = (b * H_KV + hkv) * L_KV  # dk: contiguous fp32 [B, H_KV, L_KV, D]
    dq = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for slot in tl.static_range(NUM_SPANS):
        anchor = tl.load(anchor_ptr + rows64 * NUM_SPANS + slot, mask=ok, other=-1).to(tl.int64)
        u = tl.load(dval_ptr + rows64 * NUM_SPANS + slot, mask=ok, other=0.0)
        live = ok & (anchor >= 0)
        ml = live[:, None] & dmask[None, :]
        kk = tl.load(k_ptr + k_row[:, None] + anchor[:, None] * sk_l + d[None, :], mask=ml, other=0.0)
        dq += u[:, None] * kk.to(tl.float32)
        tl.atomic_add(dk_ptr + (dk_row + anchor)[:, None] * D + d[None, :], u[:, None] * q, mask=ml, sem=SEM)
    tl.store(dq1_ptr + rows64[:, None] * D + d[None, :], dq.to(dq1_ptr.dtype.element_ty), mask=m2)


def search_backward(q1: torch.Tensor, k: torch.Tensor, qanchor: torch.Tensor, dvalues: torch.Tensor,
                    dk: torch.Tensor) -> torch.Tensor:
    """Gradient through `values` (docs/algorithm.md §2.6).

    Args:
        q1: [B, H_Q, L_Q, D] contiguous; k: [B, H_KV, L_KV, D]; qanchor: int32 [B, H_Q, L_Q, K];
        dvalues: fp32 [B, H_Q, L_Q, K] (0 on invalid slots); dk: fp32 [B, H_KV, L_KV, D], accumulated into.
    Returns:
        dq1 [B, H_Q, L_Q, D] in q1's dtype (fp32 sums, one rounding).
    """
    b, h_q, l_q, d = q1.shape
    h_kv, l_kv = k.shape[1], k.shape[2]
    num_spans = qanchor.shape[-1]
    dq1 = torch.empty(b, h_q, l_q, d, dtype=q1.dtype, device=q1.device)
    n_rows = b * h_q * l_q
    block_r = 32
    _search_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
        q1, k, qanchor.contiguous(), dvalues.contiguous(), dq1, dk,
        k.stride(0), k.stride(1), k.stride(2), h_q, h_kv, l_q, l_kv, d, h_q // h_kv, n_rows,
        NUM_SPANS=num_spans, BLOCK_R=block_r, BLOCK_D=block_d(d), SEM=common.GRAD_ATOMIC_SEM, num_warps=4)
    return dq1
