"""The dense oracle: the obviously-correct implementation of SPEC §2–3, used as the truth in tests.

It materialises the full score matrix [B, H_Q, L_Q, L_KV], a dense stripe mask from the shared
offset table, and for each branch k the explicit key set S_k ∪ Wnd. O(L_Q · L_KV) memory: small L only.
Call it through `superlinear_kernels.span_search(..., backend="oracle")`.
"""
from __future__ import annotations

import math

import torch

from .api import Prepared, SearchResult
from .config import SpanConfig
from .geometry import span_bounds, stripe_table
from .softmax import gate_weights, masked_attention


def _expand_kv(x: torch.Tensor, h_q: int) -> torch.Tensor:
    """[B, H_KV, L, D] -> [B, H_Q, L, D], query head h reading KV head h div (H_Q / H_KV)."""
    return x.repeat_interleave(h_q // x.shape[1], dim=1)


def _key_valid(prep: Prepared, l_kv: int) -> torch.Tensor:
    """bool [B, L_KV]: key j is valid for row b iff j >= s_b (left padding)."""
    keys = torch.arange(l_kv, device=prep.row_start.device)
    return keys[None, :] >= prep.row_start[:, None]


def span_search(q1: torch.Tensor, k: torch.Tensor, cfg: SpanConfig, prep: Prepared) -> SearchResult:
    """Dense search: score every key, keep anchor keys of valid stripes, stable-sort, take the top K."""
    b, h_q, l_q, _ = q1.shape
    l_kv = k.shape[2]
    scores = q1.float() @ _expand_kv(k, h_q).float().transpose(-1, -2)  # [B, H_Q, L_Q, L_KV], no 1/sqrt(D)

    q = prep.cache_position
    keys = torch.arange(l_kv, device=q1.device)
    distance = q[:, None] + 1 - keys[None, :]  # F(i) if key j is the anchor of stripe i
    offsets = stripe_table(cfg, prep.q_max + 1, device=q1.device)[cfg.sw_index + 1:]
    is_anchor = torch.isin(distance, offsets)  # [L_Q, L_KV]; only stripes i >= σ+1
    candidate = is_anchor[None] & _key_valid(prep, l_kv)[:, None, :]  # [B, L_Q, L_KV]
    scores = scores.masked_fill(~candidate[:, None], float("-inf"))

    # Tie rule: score descending, then position ascending — a stable descending sort keeps the
    # earlier key first among equal scores.
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices
    num = cfg.num_spans
    top = order[..., :num]
    values = scores.gather(-1, top)
    if top.shape[-1] < num:  # fewer keys than K
        pad = num - top.shape[-1]
        top = torch.cat([top, top.new_zeros(*top.shape[:-1], pad)], dim=-1)
        values = torch.cat([values, values.new_full((*values.shape[:-1], pad), float("-inf"))], dim=-1)
    valid = torch.isfinite(values)
    anchor = torch.where(valid, top, torch.full_like(top, -1))
    qstart, qend = span_bounds(cfg, anchor, q[None, None, :, None], prep.row_start[:, None, None, None], l_kv)
    return SearchResult(qstart.to(torch.int32), anchor.to(torch.int32), qend.to(torch.int32), values)


def superlinear_attention(q1, q2, k, v, cfg: SpanConfig, prep: Prepared):
    """Dense attention: for each branch k, softmax over the explicit key set S_k ∪ Wnd, then the gate."""
    b, h_q, l_q, d = q2.shape
    l_kv = k.shape[2]
    routing = span_search(q1, k, cfg, prep)
    logits = (q2.float() @ _expand_kv(k, h_q).float().transpose(-1, -2)) / math.sqrt(d)
    values_v = _expand_kv(v, h_q).float()

    q = prep.cache_position[None, None, :, None]  # [1, 1, L_Q, 1]
    keys = torch.arange(l_kv, device=q2.device)[None, None, None, :]
    key_valid = _key_valid(prep, l_kv)[:, None, None, :]  # [B, 1, 1, L_KV]
    w = cfg.window_len
    window = (keys >= (q - w + 1).clamp_min(0)) & (keys <= q) & key_valid if w > 0 else torch.zeros_like(key_valid)

    branches = []
    for slot in range(cfg.num_spans):
        start = routing.qstart[..., slot, None].long()
        end = routing.qend[..., slot, None].long()
        span = (keys >= start) & (keys <= end) & (start >= 0) & key_valid
        out_k, _ = masked_attention(logits, span | window, values_v)
        branches.append(out_k)
    branches = torch.stack(branches, dim=-2)  # [B, H_Q, L_Q, K, D]
    gate = gate_weights(routing.values, routing.valid)
    out = (gate.unsqueeze(-1) * branches).sum(dim=-2)
    return out.to(q2.dtype), SearchResult(routing.qstart, routing.qanchor, routing.qend, routing.values, gate)
