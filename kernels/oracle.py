"""The dense oracle: a naive, self-contained implementation of docs/algorithm.md §1–3, used as the truth in tests.

It shares no geometry or softmax code with the backends it checks (only the `SpanConfig` fields and the
result containers): stripe offsets come from an integer search of their definition, span lengths from
the ceiling formula on exact rationals, and masking, softmax and gate are written out here. It
materialises the full score matrix [B, H_Q, L_Q, L_KV] and, per branch k, the explicit key set S_k ∪ Wnd:
O(L_Q · L_KV) memory, small L only. Call it through `superlinear_kernels.span_search(..., backend="oracle")`.

Non-finite values (docs/algorithm.md §3.8 note in `superlinear_attention`): a query whose key set holds a key with a
non-finite value row gets NaN; keys outside its key set never affect it.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from .api import Prepared, SearchResult
from .config import SpanConfig

_INVALID_GATE_LOGIT = -1e9  # docs/algorithm.md §3.2: the logit of an invalid gate slot


# --------------------------------------------------------------------------- exact numbers, naively
def _rational(x: float, snap_only: bool) -> Fraction:
    """The rational a float parameter stands for (docs/algorithm.md §1.3, §1.7): the nearest fraction with denominator
    <= 1000 when within 1e-9 of it, else (factors only) the float's exact binary value."""
    near = Fraction(x).limit_denominator(1000)
    if abs(near - Fraction(x)) <= Fraction(1, 10**9):
        return near
    if snap_only:
        raise ValueError(f"oracle: power {x!r} is not within 1e-9 of a fraction u/v with v <= 1000")
    return Fraction(x)


def _offset(i: int, p: Fraction) -> int:
    """F(i) = max{n >= 0 : n^u <= i^v} for p = u/v, by doubling then bisection on integers."""
    u, v = p.numerator, p.denominator
    bound = i ** v
    hi = 1
    while hi ** u <= bound:
        hi *= 2
    lo = hi // 2  # lo^u <= bound < hi^u (lo = 0 when hi = 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid ** u <= bound:
            lo = mid
        else:
            hi = mid
    return lo


def _offsets_up_to(p: Fraction, limit: int) -> list[int]:
    """[F(1), F(2), ...] while F(i) <= limit."""
    out, i = [], 1
    while True:
        f = _offset(i, p)
        if f > limit:
            return out
        out.append(f)
        i += 1


def _ceil_length(factor: Fraction, rho: Fraction, t: int) -> int:
    """ceil(factor · t^rho) exactly: the least n >= 0 with n^v · d^v >= c^v · t^u (factor = c/d, rho = u/v)."""
    c, d, u, v = factor.numerator, factor.denominator, rho.numerator, rho.denominator
    rhs = c ** v * t ** u
    n = max(0, math.floor(float(factor) * float(t) ** float(rho)) - 2)
    if n > 0 and n ** v * d ** v >= rhs:
        raise AssertionError(f"oracle: span length estimate {n} is not below ceil({factor} * {t}^{rho})")
    while n ** v * d ** v < rhs:
        n += 1
    return n


class _Geometry:
    """The oracle's own reading of docs/algorithm.md §1 for one config and one call."""

    def __init__(self, cfg: SpanConfig, q_limit: int):
        p = _rational(cfg.search_power, snap_only=True)
        self.rho = _rational(cfg.span_power, snap_only=True)
        self.b_f = _rational(cfg.backward_factor, snap_only=False)
        self.f_f = _rational(cfg.forward_factor, snap_only=False)
        self.window = _offset(cfg.sw_index + 1, p) - 1  # W = F(σ + 1) - 1
        offsets = _offsets_up_to(p, q_limit)
        self.routed_offsets = offsets[cfg.sw_index:]  # stripes i >= σ + 1
        self._lengths: dict[int, tuple[int, int]] = {}

    def lengths(self, t: int) -> tuple[int, int]:
        if t not in self._lengths:
            self._lengths[t] = (_ceil_length(self.b_f, self.rho, t), _ceil_length(self.f_f, self.rho, t))
        return self._lengths[t]


# --------------------------------------------------------------------------- search
def _expand_kv(x: torch.Tensor, h_q: int) -> torch.Tensor:
    """[B, H_KV, L, D] -> [B, H_Q, L, D], query head h reading KV head h div (H_Q / H_KV)."""
    return x.repeat_interleave(h_q // x.shape[1], dim=1)


def _key_valid(prep: Prepared, l_kv: int) -> torch.Tensor:
    """bool [B, L_KV]: key j is valid for row b iff j >= s_b (left padding)."""
    keys = torch.arange(l_kv, device=prep.row_start.device)
    return keys[None, :] >= prep.row_start[:, None]


def _spans(geo: _Geometry, anchor: torch.Tensor, prep: Prepared, l_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qstart, qend [B, H_Q, L_Q, K] of docs/algorithm.md §1.7; -1 where the anchor is -1. Lengths and the end cap are
    worked out per (row, query) in Python integers, then applied to every slot."""
    back, fwd, lower, upper = [], [], [], []
    for s in prep.row_start.tolist():
        rows = ([], [], [], [])
        for q in prep.cache_position.tolist():
            b_t, f_t = geo.lengths(max(0, q + 1 - s))
            cap = min(q, l_kv - 1)
            if geo.window > 0:
                cap = min(cap, max(0, q - geo.window + 1) - 1)  # sw_start(q) - 1
            for column, value in zip(rows, (b_t, f_t, max(s, 0), cap)):
                column.append(value)
        for column, out in zip(rows, (back, fwd, lower, upper)):
            out.append(column)
    as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=anchor.device)[:, None, :, None]  # noqa: E731
    back, fwd, lower, upper = as_t(back), as_t(fwd), as_t(lower), as_t(upper)
    a = anchor.long()
    qstart = torch.maximum(a - back, lower)
    qend = torch.minimum(a + fwd, upper)
    minus_one = torch.full_like(a, -1)
    return torch.where(a >= 0, qstart, minus_one), torch.where(a >= 0, qend, minus_one)


def span_search(q1: torch.Tensor, k: torch.Tensor, cfg: SpanConfig, prep: Prepared) -> SearchResult:
    """Dense search: score every key, keep anchor keys of valid stripes, stable-sort, take the top K."""
    return _search(q1, k, cfg, prep, _Geometry(cfg, prep.q_max + 1))


def _search(q1, k, cfg: SpanConfig, prep: Prepared, geo: _Geometry) -> SearchResult:
    b, h_q, l_q, _ = q1.shape
    l_kv = k.shape[2]
    scores = q1.float() @ _expand_kv(k, h_q).float().transpose(-1, -2)  # [B, H_Q, L_Q, L_KV], no 1/sqrt(D)

    keys = torch.arange(l_kv, device=q1.device)
    distance = prep.cache_position[:, None] + 1 - keys[None, :]  # F(i) if key j is the anchor of stripe i
    offsets = torch.tensor(geo.routed_offsets, dtype=torch.int64, device=q1.device)
    is_anchor = torch.isin(distance, offsets)  # [L_Q, L_KV]
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
    qstart, qend = _spans(geo, anchor, prep, l_kv)
    return SearchResult(qstart.to(torch.int32), anchor.to(torch.int32), qend.to(torch.int32), values)


# --------------------------------------------------------------------------- attention
def _softmax_attend(logits: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor,
                    bad_key: torch.Tensor) -> torch.Tensor:
    """softmax over the allowed keys of each row, times values; 0 for a row with no allowed key and NaN
    for a row whose allowed keys include a bad (non-finite) value row. logits/allowed [B, H, L_Q, L_KV],
    values [B, H, L_KV, D] (already zero on bad rows), bad_key bool [B, H, 1, L_KV]."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    top = masked.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    weights = torch.exp(masked - top)
    total = weights.sum(dim=-1, keepdim=True)
    out = (weights / torch.where(total > 0, total, torch.ones_like(total))) @ values
    poisoned = (allowed & bad_key).any(dim=-1, keepdim=True)
    return torch.where(poisoned, torch.full_like(out, float("nan")), out)


def _gate(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """g = softmax over the K slots of ṽ (v on valid slots, -1e9 on invalid ones), docs/algorithm.md §3.2."""
    logits = torch.where(valid, values, torch.full_like(values, _INVALID_GATE_LOGIT))
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach())
    return e / e.sum(dim=-1, keepdim=True)


def superlinear_attention(q1, q2, k, v, cfg: SpanConfig, prep: Prepared, routing: SearchResult | None = None):
    """Dense attention: for each branch k, softmax over the explicit key set S_k ∪ Wnd, then the gate.
    `routing` (already validated by the API) replaces the search."""
    b, h_q, l_q, d = q2.shape
    l_kv = k.shape[2]
    geo = _Geometry(cfg, prep.q_max + 1)
    routing = _search(q1, k, cfg, prep, geo) if routing is None else routing
    logits = (q2.float() @ _expand_kv(k, h_q).float().transpose(-1, -2)) / math.sqrt(d)
    values_v = _expand_kv(v, h_q).float()
    bad_key = ~torch.isfinite(values_v).all(dim=-1)  # [B, H_Q, L_KV]
    values_v = torch.where(bad_key[..., None], torch.zeros_like(values_v), values_v)
    bad_key = bad_key[:, :, None, :]

    q = prep.cache_position[None, None, :, None]  # [1, 1, L_Q, 1]
    keys = torch.arange(l_kv, device=q2.device)[None, None, None, :]
    key_valid = _key_valid(prep, l_kv)[:, None, None, :]  # [B, 1, 1, L_KV]
    w = geo.window
    if w > 0:
        window = (keys >= q - w + 1) & (keys >= 0) & (keys <= q) & key_valid
    else:
        window = torch.zeros_like(key_valid)

    branches = []
    for slot in range(cfg.num_spans):
        start = routing.qstart[..., slot, None].long()
        end = routing.qend[..., slot, None].long()
        span = (keys >= start) & (keys <= end) & (start >= 0) & key_valid
        branches.append(_softmax_attend(logits, span | window, values_v, bad_key))
    branches = torch.stack(branches, dim=-2)  # [B, H_Q, L_Q, K, D]
    gate = _gate(routing.values, routing.valid)
    out = (gate.unsqueeze(-1) * branches).sum(dim=-2)
    return out.to(q2.dtype), SearchResult(routing.qstart, routing.qanchor, routing.qend, routing.values, gate)
