"""Exact geometry of Superlinear attention (docs/algorithm.md §1): the one stripe-offset table F(i), the window,
the maximum stripe index M(x), span lengths B(t)/Fw(t), the candidate spans of a query, and the
coverage checker that proves (or refutes) structural non-exclusion.

Every other path — oracle, torch backend, Triton kernels, widgets — reads offsets and span lengths
from the tables built here (Decision D1 in docs/design.md), so no two paths can disagree on where an anchor lies.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property
from threading import Lock

import torch

from .config import SpanConfig

# --------------------------------------------------------------------------- stripe table
_tables: dict[tuple[int, int], list[int]] = {}
_tensor_cache: dict[tuple, torch.Tensor] = {}
_lock = Lock()




def _exact_offset(i: int, u: int, v: int) -> int:
    """F(i) = max{n >= 0 : n^u <= i^v}, with a float64 estimate corrected by integer comparison."""
    if u == 1:
        return i ** v
    target = i ** v
    n = int(math.floor(i ** (v / u)))
    while n > 0 and n ** u > target:
        n -= 1
    while (n + 1) ** u <= target:
        n += 1
    return n


def _grow_table(cfg: SpanConfig, max_offset: int) -> list[int]:
    """The cached list [F(0), F(1), ...] extended until it holds the first offset > max_offset."""
    u, v = cfg.power_fraction
    with _lock:
        table = _tables.setdefault((u, v), [0, 1])
        while table[-1] <= max_offset:
            table.append(_exact_offset(len(table), u, v))
        return table


def stripe_offset(cfg: SpanConfig, i: int) -> int:
    """F(i) = floor(i^(1/p)), exactly (docs/algorithm.md §1.3). F(0) = 0, F(1) = 1."""
    if i < 0:
        raise ValueError(f"stripe index i={i}: expected i >= 0")
    u, v = cfg.power_fraction
    with _lock:
        table = _tables.setdefault((u, v), [0, 1])
        if i < len(table):
            return table[i]
    return _exact_offset(i, u, v)


def stripe_table(cfg: SpanConfig, max_offset: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 tensor T with T[i] = F(i) for i = 0 .. M(max_offset) + 1.

    The last entry is the first offset beyond `max_offset`, so `searchsorted` on the table answers
    M(x) for any x <= max_offset. Cached per (p, extent, device); callers must not modify it.
    """
    max_offset = max(int(max_offset), 1)
    table = _grow_table(cfg, max_offset)
    n = max_stripe(cfg, max_offset) + 2
    key = (cfg.power_fraction, n, str(device))
    cached = _tensor_cache.get(key)
    if cached is None:
        # Offsets past the int64 range can only be the sentinel entry; clamp it.
        values = [min(x, 2**62) for x in table[:n]]
        cached = torch.tensor(values, dtype=torch.int64, device=device)
        _tensor_cache[key] = cached
    return cached


def max_stripe(cfg: SpanConfig, x: int) -> int:
    """M(x) = max{i : F(i) <= x}; 0 for x < 1 (docs/algorithm.md §1.6)."""
    if x < 1:
        return 0
    table = _grow_table(cfg, x)
    lo, hi = 1, len(table) - 1  # F(lo) <= x < F(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if table[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo


def window_len(cfg: SpanConfig) -> int:
    """W(σ) = F(σ + 1) - 1 (docs/algorithm.md §1.5)."""
    return cfg.window_len


def window_bounds(cfg: SpanConfig, q, start=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive sliding-window bounds (lo, hi) of query positions `q` in rows starting at `start` (docs/algorithm.md §1.5).

    The one place the window rule lives. q, start: ints or int64 tensors (broadcast together).
    Returns two int64 tensors of the broadcast shape (0-d for int inputs): lo = max(q - W + 1, s, 0),
    hi = q; both -1 where the window is empty (W = 0, or s > q). With start = 0, lo is sw_start(q), the
    key after which no span may end (docs/algorithm.md §1.7).
    """
    q = torch.as_tensor(q, dtype=torch.int64)
    start = torch.as_tensor(start, dtype=torch.int64, device=q.device)
    w = cfg.window_len
    lo = torch.maximum((q - w + 1).clamp_min(0), start)
    empty = (lo > q) | (w == 0)
    minus_one = torch.full_like(lo, -1)
    return torch.where(empty, minus_one, lo), torch.where(empty, minus_one, q.expand_as(lo))


# --------------------------------------------------------------------------- span lengths
def _exact_ceil_lengths(factor, power: tuple[int, int], t_max: int) -> torch.Tensor:
    """int64 [t_max + 1]: ceil(c · t^(u/v)) for t = 0 .. t_max, exactly, for a rational c >= 0.

    float64 gives each value to within a few ulps, so its ceiling can be wrong only where the exact value
    is within that of an integer n. There (|x - n| <= 1e-9 · max(1, x), far wider than float64's error)
    the ceiling is n iff c · t^(u/v) <= n iff cn^v · t^u <= n^v · cd^v (c = cn/cd), decided on
    Python integers, and n + 1 otherwise (so n = 0 gives 1 unless c · t = 0). Elsewhere the
    float ceiling is already exact. Typical presets flag a few thousand t out of millions.
    """
    if factor == 0:  # f_f = 0: no forward part (and every float value would sit on an integer)
        return torch.zeros(t_max + 1, dtype=torch.int64)
    u, v = power
    x = torch.pow(torch.arange(t_max + 1, dtype=torch.float64), u / v).mul_(float(factor))
    out = torch.ceil(x).to(torch.int64)
    distance = torch.round(x).sub_(x).abs_()
    flagged = (distance <= torch.clamp(x, min=1.0).mul_(1e-9)).nonzero().squeeze(1)
    if flagged.numel():
        cn_v, cd_v = factor.numerator ** v, factor.denominator ** v
        nearest = torch.round(x[flagged]).to(torch.int64).tolist()
        fixed = [n if cn_v * ti ** u <= n ** v * cd_v else n + 1 for ti, n in zip(flagged.tolist(), nearest)]
        out[flagged] = torch.tensor(fixed, dtype=torch.int64)
    return out


def span_lengths(cfg: SpanConfig, t_max: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Fw): int64 tensors of length >= t_max + 1 with B[t] = ceil(b_f t^ρ), Fw[t] = ceil(f_f t^ρ).

    The single routine every path uses (docs/algorithm.md §1.7, Decision D1 in docs/design.md). The ceiling acts on exact values: ρ and
    the factors are the rationals of `SpanConfig.span_fraction` / `factor_fractions` (0.55 = 11/20), so
    b_f = 2, ρ = ½, t = 16 gives 8 and the release preset at t = 2^20 gives B = 6144, Fw = 2048 (a float64
    ceiling gives 6145, 2049). Cached per (b_f, f_f, ρ, extent, device); the extent is rounded up to a
    power of two so growing caches reuse tables.
    """
    n = 1 << max(int(t_max), 1).bit_length()
    key = ("span", float(cfg.backward_factor), float(cfg.forward_factor), float(cfg.span_power), n, str(device))
    cached = _tensor_cache.get(key)
    if cached is None:
        backward_factor, forward_factor = cfg.factor_fractions
        backward = _exact_ceil_lengths(backward_factor, cfg.span_fraction, n)
        forward = _exact_ceil_lengths(forward_factor, cfg.span_fraction, n)
        cached = torch.stack([backward, forward]).to(device)
        _tensor_cache[key] = cached
    return cached[0], cached[1]


def span_bounds(cfg: SpanConfig, anchor: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                l_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Span [qstart, qend] around each anchor (docs/algorithm.md §1.7); -1 where the anchor is -1.

    anchor, q, s: broadcastable int64 tensors (anchor position, query position, row start).
    qstart = max(a - B(t), s, 0); qend = min(a + Fw(t), q, L_KV - 1, sw_start(q) - 1 [if W > 0]),
    with t = max(0, q + 1 - s) — every span of one query shares the query's length.
    """
    t = (q + 1 - s).clamp_min(0)
    backward, forward = span_lengths(cfg, int(t.max()) if t.numel() else 1, device=anchor.device)
    qstart = torch.maximum(anchor - backward[t], s.clamp_min(0))
    qend = torch.minimum(anchor + forward[t], torch.clamp(q, max=l_kv - 1))
    if cfg.window_len > 0:
        qend = torch.minimum(qend, window_bounds(cfg, q)[0] - 1)
    valid = anchor >= 0
    minus_one = torch.full_like(qstart, -1)
    return torch.where(valid, qstart, minus_one), torch.where(valid, qend, minus_one)


# --------------------------------------------------------------------------- one query, in full
@dataclass(frozen=True)
class Stripe:
    """One stripe of one query: its offset, anchor and span (qstart = qend = -1 if not a candidate)."""

    index: int  # stripe i >= σ + 1
    offset: int  # F(i)
    anchor: int  # a_i = q + 1 - F(i)
    candidate: bool  # 0 <= a_i and a_i >= s (the anchor is a valid key)
    qstart: int
    qend: int


@dataclass(frozen=True, eq=False)
class QueryGeometry:
    """Everything the geometry says about one query: window, stripes, spans (docs/algorithm.md §1.4–1.7).

    The stripes are held as int64 tensors [S] over i = σ+1 .. M(q + 1), nearest anchor first (one
    vectorised computation, cheap at any q); `stripes` / `candidates` give them as `Stripe` records.
    """

    query: int  # q
    start: int  # s, the row start
    t: int  # max(0, q + 1 - s)
    window: tuple[int, int] | None  # [max(sw_start, s), q], or None when empty
    backward_len: int  # B(t)
    forward_len: int  # Fw(t)
    stripe_index: torch.Tensor  # int64 [S]: i
    offsets: torch.Tensor  # int64 [S]: F(i)
    anchors: torch.Tensor  # int64 [S]: a_i = q + 1 - F(i)
    candidate: torch.Tensor  # bool [S]: s <= a_i < L_KV
    qstart: torch.Tensor  # int64 [S]: span start, -1 where not a candidate
    qend: torch.Tensor  # int64 [S]: span end, -1 where not a candidate

    @cached_property
    def stripes(self) -> tuple[Stripe, ...]:
        """All stripes i = σ+1 .. M(q + 1), nearest first, as records."""
        columns = (self.stripe_index, self.offsets, self.anchors, self.candidate, self.qstart, self.qend)
        return tuple(Stripe(*row) for row in zip(*(c.tolist() for c in columns)))

    @property
    def candidates(self) -> tuple[Stripe, ...]:
        return tuple(st for st in self.stripes if st.candidate)

    def covered(self) -> list[tuple[int, int]]:
        """The union of window and candidate spans as sorted disjoint inclusive intervals."""
        keep = self.candidate & (self.qend >= self.qstart)
        intervals = list(zip(self.qstart[keep].tolist(), self.qend[keep].tolist()))
        if self.window is not None:
            intervals.append(self.window)
        return merge_intervals(intervals)

    def first_uncovered(self) -> int | None:
        """Smallest key in [s, q] that neither the window nor any candidate span reaches."""
        return first_uncovered_key(self.covered(), self.start, self.query)


def merge_intervals(intervals) -> list[tuple[int, int]]:
    """Sorted disjoint union of inclusive integer intervals (touching intervals are joined)."""
    merged: list[list[int]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def first_uncovered_key(union, start: int, q: int) -> int | None:
    """Smallest key in [start, q] outside `union` (sorted disjoint intervals), or None."""
    expected = start
    for a, b in union:
        if a > expected:
            return expected
        expected = max(expected, b + 1)
    return expected if expected <= q else None


def query_geometry(cfg: SpanConfig, q: int, start: int = 0, l_kv: int | None = None) -> QueryGeometry:
    """Window, stripes and spans of query position `q` in a row whose first valid key is `start`."""
    if q < 0:
        raise ValueError(f"query position q={q}: expected q >= 0")
    if start < 0:
        raise ValueError(f"row start s={start}: expected s >= 0")
    l_kv = q + 1 if l_kv is None else l_kv
    if l_kv < q + 1:
        raise ValueError(f"l_kv={l_kv}: expected >= q + 1 = {q + 1}")
    t = max(0, q + 1 - start)
    backward, forward = span_lengths(cfg, max(t, 1))
    lo, hi = window_bounds(cfg, q, start)
    window = (int(lo), int(hi)) if lo >= 0 else None
    index = torch.arange(cfg.sw_index + 1, max(max_stripe(cfg, q + 1), cfg.sw_index) + 1, dtype=torch.int64)
    offsets = stripe_table(cfg, q + 1)[index]
    anchors = q + 1 - offsets
    candidate = (anchors >= start) & (anchors < l_kv)
    qs, qe = span_bounds(cfg, torch.where(candidate, anchors, -1), torch.tensor(q), torch.tensor(start), l_kv)
    return QueryGeometry(q, start, t, window, int(backward[t]), int(forward[t]), index, offsets, anchors,
                         candidate, qs, qe)


# --------------------------------------------------------------------------- coverage
@dataclass(frozen=True)
class CoverageReport:
    """Result of `coverage`: ok, or the first uncovered (query, key)."""

    ok: bool
    first_gap: tuple[int, int] | None  # (query position, key position) of the first miss
    length: int  # queries 0 .. length-1 (shifted by `start`) were checked
    start: int
    seconds: float

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        status = "covered" if self.ok else f"first gap at query {self.first_gap[0]}, key {self.first_gap[1]}"
        return f"CoverageReport({status}; {self.length} queries from s={self.start}, {self.seconds:.3f} s)"


def coverage(cfg: SpanConfig, length: int, start: int = 0) -> CoverageReport:
    """Prove structural non-exclusion for every query of a row of `length` tokens, or find the first gap.

    The union window ∪ (all candidate spans) must equal [s, q] for each query q = s .. s + length - 1.
    Geometry depends only on t = q + 1 - s, so the check runs on t = 1 .. length in O(length) tensor
    work (docs/algorithm.md §1.8): spans of consecutive candidate stripes i, i+1 meet iff
    F(i+1) - F(i) <= B(t) + Fw(t) + 1 (needed only while the upper span's start a_i - B(t) > s), and
    the deepest span reaches s iff t - F(M(t)) <= B(t). A failing query is then enumerated exactly to
    name the smallest uncovered key.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length={length!r}: expected an int >= 1")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start={start!r}: expected an int >= 0")
    began = time.perf_counter()
    sigma = cfg.sw_index
    table = stripe_table(cfg, length)  # F(0..M(length)+1)
    t = torch.arange(1, length + 1, dtype=torch.int64)
    m = torch.searchsorted(table, t, right=True) - 1  # M(t)
    backward, forward = span_lengths(cfg, length)
    b_t, f_t = backward[t], forward[t]

    gaps = table[1:] - table[:-1]  # gaps[i] = F(i+1) - F(i)
    gaps = torch.where(torch.arange(len(gaps)) > sigma, gaps, torch.zeros_like(gaps))
    prefix_max = torch.cummax(gaps, dim=0).values  # max over σ+1 <= i <= j of gaps[i]

    has_candidates = m > sigma
    bottom_ok = (t - table[m]) <= b_t
    deep = torch.searchsorted(table, (t - b_t - 1).clamp_min(0), right=True) - 1  # M(t - B - 1)
    j = torch.minimum(m - 1, deep).clamp_min(0)
    interior_ok = prefix_max[j] <= b_t + f_t + 1
    ok = ~has_candidates | (bottom_ok & interior_ok)

    if bool(ok.all()):
        return CoverageReport(True, None, length, start, time.perf_counter() - began)
    t_fail = int(t[~ok][0])
    q = start + t_fail - 1
    key = query_geometry(cfg, q, start).first_uncovered()
    if key is None:  # the fast condition and the exact enumeration must agree
        raise AssertionError(f"coverage: fast check flagged q={q} but enumeration found no gap ({cfg})")
    return CoverageReport(False, (q, key), length, start, time.perf_counter() - began)
