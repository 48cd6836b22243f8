"""The efficient torch backend: O(L^(1+p) + L^(1+ρ)) work, bounded memory, any device.

This is what CPUs run (CI, laptops, notebooks). Same routing and outputs as the oracle.

* **Search** scans only the stripes σ+1 … M(q_max+1), chunked over queries: one gather of the anchor
  keys per KV head (shared by its query heads), raw fp32 dot products, then K rounds of argmax over
  stripes ordered earliest position first (argmax returns the first maximum: the tie rule, docs/algorithm.md §2.3).
* **Attention** treats the window and every span as a *contiguous key range* [lo, hi] — both are
  already clipped to the row start s, so no key mask is needed. Pairs (query head, query, range) are
  sorted by (batch, KV head, first key block of 64) and packed into dense tiles of pairs that start in
  the same block; each tile gathers one window of keys for a batched [pairs × D]·[D × keys] matmul with
  a range mask (the CPU analogue of the bucketed prefill, docs/algorithm.md §3.6). Branch and window are merged by
  log-sum-exp, then gated (§3.2–3.3).

Memory bound (beyond inputs, outputs and one fp32 copy of K/V): the search holds at most
`SEARCH_CHUNK_ELEMS` fp32 gathered elements (64 MiB) at a time, attention at most `TILE_BATCH_ELEMS`
(64 MiB, times the few temporaries of a softmax) of gathered keys and logits, plus the per-pair
bookkeeping (a few int64 per pair, i.e. O(B · H_Q · L_Q · K)). Routing/output tensors are O(B · H_Q · L_Q · K · D). Under autograd the gathered
tiles are saved for backward, so gradients cost O(B · H_Q · L_Q · K · span length) memory: use moderate
L (training runs on the GPU kernels).
"""
from __future__ import annotations

import math

import torch

from .api import Prepared, SearchResult
from .config import SpanConfig
from .geometry import span_bounds, stripe_table, window_bounds
from .softmax import gate_weights, masked_attention, merge_with_window

SEARCH_CHUNK_ELEMS = 16 * 1024 * 1024  # fp32 elements of gathered anchor keys per search chunk (64 MiB)
KEY_BLOCK = 64  # pairs are grouped by the key block their range starts in
MIN_TILE_PAIRS, MAX_TILE_PAIRS = 8, 256  # pairs per dense tile (all starting in one key block)
TILE_BATCH_ELEMS = 16 * 1024 * 1024  # fp32 elements of gathered keys + logits per batch of tiles (64 MiB)


def _search_stripes(cfg: SpanConfig, prep: Prepared, device) -> torch.Tensor:
    """Offsets F(i) of stripes σ+1 … M(q_max + 1), ordered by ascending anchor position (largest i first)."""
    offsets = stripe_table(cfg, prep.q_max + 1, device=device)
    last = int(torch.searchsorted(offsets, torch.tensor(prep.q_max + 1, device=device), right=True)) - 1
    return offsets[cfg.sw_index + 1: last + 1].flip(0)


def _chunks_of_scores(q1: torch.Tensor, k: torch.Tensor, prep: Prepared, offsets: torch.Tensor):
    """Yield (anchor [C, S], scores [B, H_Q, C, S] fp32, -inf on non-candidates) per query chunk.

    Each chunk gathers its anchor key rows once per KV head ([B, H_KV, C, S, D], at most
    SEARCH_CHUNK_ELEMS elements) and scores all query heads of the group with one batched matmul.
    Few large ops rather than one op per stripe: on a busy CPU, many small multi-threaded ops stall.
    """
    b, h_q, l_q, d = q1.shape
    h_kv, l_kv = k.shape[1], k.shape[2]
    group = h_q // h_kv
    n_stripes = offsets.numel()
    kf = k.float()
    # [B, H_KV, L_Q, G, D]: the heads of a group side by side, so one matmul scores them all.
    q1f = q1.float().view(b, h_kv, group, l_q, d).transpose(2, 3)
    key_valid = torch.arange(l_kv, device=q1.device)[None, :] >= prep.row_start[:, None]  # [B, L_KV]
    chunk = max(1, SEARCH_CHUNK_ELEMS // max(1, b * h_kv * n_stripes * d))
    for c0 in range(0, l_q, chunk):
        qc = prep.cache_position[c0:c0 + chunk]
        anchor = qc[:, None] + 1 - offsets[None, :]  # [C, S]
        inside = (anchor >= 0) & (anchor < l_kv)
        safe = anchor.clamp(0, l_kv - 1)
        candidate = inside[None] & key_valid[:, safe]  # [B, C, S]
        keys_at = kf[:, :, safe]  # [B, H_KV, C, S, D]
        scores = q1f[:, :, c0:c0 + chunk] @ keys_at.transpose(-1, -2)  # [B, H_KV, C, G, S]
        scores = scores.masked_fill(~candidate[:, None, :, None], float("-inf"))
        yield anchor, scores.permute(0, 1, 3, 2, 4).reshape(b, h_q, -1, n_stripes)


def stripe_scores(q1: torch.Tensor, k: torch.Tensor, cfg: SpanConfig, prep: Prepared):
    """Search value of every stripe σ+1 … M(q_max + 1): (stripes [S], anchors [L_Q, S], values [B, H_Q, L_Q, S]).

    Stripes are in ascending index (nearest anchor first); values are -inf on non-candidates.
    """
    offsets = _search_stripes(cfg, prep, q1.device)
    stripes = torch.arange(cfg.sw_index + 1, cfg.sw_index + 1 + offsets.numel(), device=q1.device)
    anchors, values = [], []
    for anchor, scores in _chunks_of_scores(q1, k, prep, offsets):
        anchors.append(anchor.flip(-1))
        values.append(scores.flip(-1))
    if not anchors:
        l_q = q1.shape[2]
        return stripes, torch.empty(l_q, 0, dtype=torch.int64), q1.new_empty(*q1.shape[:3], 0, dtype=torch.float32)
    return stripes, torch.cat(anchors), torch.cat(values, dim=2)


def span_search(q1: torch.Tensor, k: torch.Tensor, cfg: SpanConfig, prep: Prepared) -> SearchResult:
    """Search over stripes σ+1 … M(q_max + 1) in query chunks; see the module docstring."""
    b, h_q, l_q, _ = q1.shape
    l_kv = k.shape[2]
    num = cfg.num_spans
    offsets = _search_stripes(cfg, prep, q1.device)
    n_stripes = offsets.numel()
    if n_stripes == 0:
        anchors = torch.full((b, h_q, l_q, num), -1, dtype=torch.int64, device=q1.device)
        values = torch.full((b, h_q, l_q, num), float("-inf"), dtype=torch.float32, device=q1.device)
        return _finish_search(cfg, prep, anchors, values, l_kv)
    anchor_parts, value_parts = [], []
    for anchor, scores in _chunks_of_scores(q1, k, prep, offsets):
        picked, picked_values = [], []
        remaining = scores.detach().clone()
        for _ in range(min(num, n_stripes)):
            best = remaining.argmax(dim=-1, keepdim=True)  # first maximum = earliest position
            picked.append(best)
            picked_values.append(scores.gather(-1, best))
            remaining.scatter_(-1, best, float("-inf"))
        idx = torch.cat(picked, dim=-1)
        vals = torch.cat(picked_values, dim=-1)
        pos = anchor[None, None].expand(b, h_q, -1, -1).gather(-1, idx)
        pos = torch.where(torch.isfinite(vals), pos, torch.full_like(pos, -1))
        anchor_parts.append(pos)
        value_parts.append(vals)
    anchors = torch.cat(anchor_parts, dim=2)
    values = torch.cat(value_parts, dim=2)
    if anchors.shape[-1] < num:  # fewer stripes than K: pad invalid slots
        pad = num - anchors.shape[-1]
        anchors = torch.cat([anchors, anchors.new_full((b, h_q, l_q, pad), -1)], dim=-1)
        values = torch.cat([values, values.new_full((b, h_q, l_q, pad), float("-inf"))], dim=-1)
    return _finish_search(cfg, prep, anchors, values, l_kv)


def _finish_search(cfg, prep, anchors, values, l_kv) -> SearchResult:
    q = prep.cache_position[None, None, :, None]
    qstart, qend = span_bounds(cfg, anchors, q, prep.row_start[:, None, None, None], l_kv)
    return SearchResult(qstart.to(torch.int32), anchors.to(torch.int32), qend.to(torch.int32), values)


def range_attention(q: torch.Tensor, query: torch.Tensor, batch: torch.Tensor, kv_head: torch.Tensor,
                    lo: torch.Tensor, hi: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of pairs (query row, contiguous key range), in dense tiles.

    q [N, D] fp32 query rows; query, batch, kv_head, lo, hi [P] int64: pair p attends with row query[p]
    to keys [lo[p], hi[p]] of (batch[p], kv_head[p]) (empty when hi < lo or lo < 0); k, v [B, H_KV, L_KV, D]
    fp32. Returns out [P, D] (0 for empty ranges) and lse [P] (-inf there).

    Pairs are sorted by (batch, KV head, lo // 64) and packed P at a time into tiles whose pairs all
    start in the same key block; a tile reads one window of R keys from that block on (R = the call's
    longest range end, measured from its block start), so the work is batched [tiles, P, D] x
    [tiles, D, R] matmuls with no Python loop per group. P is the power of two nearest the mean group
    size (clamped to [MIN_TILE_PAIRS, MAX_TILE_PAIRS]): big enough to share each gathered key window
    among many pairs, small enough not to pad sparse groups.
    """
    n_pairs, d = lo.numel(), q.shape[1]
    h_kv, l_kv = k.shape[1], k.shape[2]
    live = ((lo >= 0) & (hi >= lo)).nonzero().squeeze(1)
    if live.numel() == 0:
        return q.new_zeros(n_pairs, d), q.new_full((n_pairs,), float("-inf"))
    block_start = (lo[live] // KEY_BLOCK) * KEY_BLOCK
    row = batch[live] * h_kv + kv_head[live]  # which [L_KV, D] slice of k/v
    order = torch.argsort(row * l_kv + block_start, stable=True)
    live, block_start, row = live[order], block_start[order], row[order]
    group_key = row * l_kv + block_start
    _, group_of_pair, counts = torch.unique_consecutive(group_key, return_inverse=True, return_counts=True)
    group_first = torch.cumsum(counts, 0) - counts  # index of each group's first pair
    rank = torch.arange(live.numel(), device=q.device) - group_first[group_of_pair]
    mean = live.numel() / counts.numel()
    tile_pairs = min(MAX_TILE_PAIRS, max(MIN_TILE_PAIRS, 1 << max(0, round(mean).bit_length() - 1)))
    tiles_per_group = (counts + tile_pairs - 1) // tile_pairs
    tile_first = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    tile_of_pair = tile_first[group_of_pair] + rank // tile_pairs
    slot_of_pair = tile_of_pair * tile_pairs + rank % tile_pairs
    n_tiles = int(tiles_per_group.sum())
    n_slots = n_tiles * tile_pairs
    span = int((hi[live] - block_start).max()) + 1  # R: keys read per tile

    # Per tile: which k/v slice and its first key. Per slot: its pair, or an empty range [1, 0] when unused.
    tile_row = torch.zeros(n_tiles, dtype=torch.int64, device=q.device).index_put((tile_of_pair,), row)
    tile_start = torch.zeros(n_tiles, dtype=torch.int64, device=q.device).index_put((tile_of_pair,), block_start)
    slot_query = torch.zeros(n_slots, dtype=torch.int64, device=q.device).index_put((slot_of_pair,), query[live])
    slot_lo = torch.ones(n_slots, dtype=torch.int64, device=q.device).index_put((slot_of_pair,), lo[live])
    slot_hi = torch.zeros(n_slots, dtype=torch.int64, device=q.device).index_put((slot_of_pair,), hi[live])
    k_rows, v_rows = k.reshape(-1, d), v.reshape(-1, d)
    offsets = torch.arange(span, device=q.device)

    # One extra zero row (index n_slots) answers the pairs with an empty range.
    slot_out = q.new_zeros(n_slots + 1, d)
    slot_lse = q.new_full((n_slots + 1,), float("-inf"))
    per_tile = span * (2 * d + 4 * tile_pairs)
    tiles_per_batch = max(1, TILE_BATCH_ELEMS // per_tile)
    for t0 in range(0, n_tiles, tiles_per_batch):
        t1 = min(n_tiles, t0 + tiles_per_batch)
        s0, s1 = t0 * tile_pairs, t1 * tile_pairs
        positions = tile_start[t0:t1, None] + offsets[None, :]  # [T, R]
        key_index = tile_row[t0:t1, None] * l_kv + positions.clamp(max=l_kv - 1)
        keys, vals = k_rows[key_index], v_rows[key_index]  # [T, R, D]
        queries = q[slot_query[s0:s1]].view(t1 - t0, tile_pairs, d)
        logits = (queries @ keys.transpose(1, 2)) * scale  # [T, tile_pairs, R]
        allowed = (positions[:, None, :] >= slot_lo[s0:s1].view(-1, tile_pairs, 1)) & \
                  (positions[:, None, :] <= slot_hi[s0:s1].view(-1, tile_pairs, 1))
        o, l = masked_attention(logits, allowed, vals)
        slot_out[s0:s1] = o.reshape(-1, d)
        slot_lse[s0:s1] = l.reshape(-1)
    slot_of = torch.full((n_pairs,), n_slots, dtype=torch.int64, device=q.device).index_put((live,), slot_of_pair)
    return slot_out[slot_of], slot_lse[slot_of]


def _poison(out: torch.Tensor, bad_before: torch.Tensor, batch: torch.Tensor, kv_head: torch.Tensor,
            lo: torch.Tensor, hi: torch.Tensor, h_kv: int, l_kv: int) -> torch.Tensor:
    """out [P, D] with NaN rows where the pair's key range [lo, hi] holds a non-finite V row.
    bad_before: flat [B, H_KV, L_KV + 1] count of such rows before each key."""
    live = (lo >= 0) & (hi >= lo)
    base = (batch * h_kv + kv_head) * (l_kv + 1)
    count = bad_before[base + (hi + 1).clamp(0, l_kv)] - bad_before[base + lo.clamp(0, l_kv)]
    return torch.where((live & (count > 0))[:, None], torch.full_like(out, float("nan")), out)


def superlinear_attention(q1, q2, k, v, cfg: SpanConfig, prep: Prepared, routing: SearchResult | None = None):
    """Search (unless `routing` is given), window and span branches over contiguous ranges, LSE merge, gate;
    see the module docstring."""
    b, h_q, l_q, d = q2.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    routing = span_search(q1, k, cfg, prep) if routing is None else routing
    kf, vf = k.float(), v.float()
    # Non-finite V rows (api docstring): zero them so that a key tile never multiplies 0 weight by Inf, and
    # make every range that holds one NaN, as the definition gives.
    bad_rows = ~torch.isfinite(vf).all(dim=-1)  # [B, H_KV, L_KV]
    if bool(bad_rows.any()):
        vf = torch.where(bad_rows[..., None], torch.zeros_like(vf), vf)
        bad_before = torch.nn.functional.pad(bad_rows.long().cumsum(-1), (1, 0)).reshape(-1)  # [B*H_KV*(L_KV+1)]
    else:
        bad_before = None
    scale = 1.0 / math.sqrt(d)
    dev = q2.device

    bb = torch.arange(b, device=dev)[:, None, None].expand(b, h_q, l_q)
    hh = (torch.arange(h_q, device=dev) // group)[None, :, None].expand(b, h_q, l_q)
    q = prep.cache_position[None, None, :].expand(b, h_q, l_q)
    s = prep.row_start[:, None, None].expand(b, h_q, l_q)
    q2f = q2.float().reshape(-1, d)

    win_lo, win_hi = window_bounds(cfg, q, s)  # -1 where empty (W = 0): range_attention gives 0, lse -inf
    win_out, win_lse = range_attention(q2f, torch.arange(q2f.shape[0], device=dev), bb.reshape(-1), hh.reshape(-1),
                                       win_lo.reshape(-1), win_hi.reshape(-1), kf, vf, scale)
    if bad_before is not None:
        win_out = _poison(win_out, bad_before, bb.reshape(-1), hh.reshape(-1), win_lo.reshape(-1),
                          win_hi.reshape(-1), h_kv, k.shape[2])

    num = cfg.num_spans
    span_out, span_lse = range_attention(
        q2f, torch.arange(q2f.shape[0], device=dev).repeat_interleave(num), bb.reshape(-1).repeat_interleave(num),
        hh.reshape(-1).repeat_interleave(num),
        routing.qstart.reshape(-1).long(), routing.qend.reshape(-1).long(), kf, vf, scale)
    if bad_before is not None:
        span_out = _poison(span_out, bad_before, bb.reshape(-1).repeat_interleave(num),
                           hh.reshape(-1).repeat_interleave(num), routing.qstart.reshape(-1).long(),
                           routing.qend.reshape(-1).long(), h_kv, k.shape[2])

    branches = merge_with_window(span_out.view(-1, num, d), span_lse.view(-1, num), win_out, win_lse)
    gate = gate_weights(routing.values, routing.valid)
    out = (gate.reshape(-1, num, 1) * branches).sum(dim=1).view(b, h_q, l_q, d)
    return out.to(q2.dtype), SearchResult(routing.qstart, routing.qanchor, routing.qend, routing.values, gate)
