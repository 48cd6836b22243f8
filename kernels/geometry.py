"""Exact geometry of Superlinear attention (SPEC §1): the one stripe-offset table F(i), the window,
the maximum stripe index M(x), span lengths B(t)/Fw(t), the candidate spans of a query, and the
coverage checker that proves (or refutes) structural non-exclusion.

Every other path — oracle, torch backend, Triton kernels, widgets — reads offsets and span lengths
from the tables built here (Decision D1), so no two paths can disagree on where an anchor lies.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
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
    """F(i) = floor(i^(1/p)), exactly (SPEC §1.3). F(0) = 0, F(1) = 1."""
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
    """M(x) = max{i : F(i) <= x}; 0 for x < 1 (SPEC §1.6)."""
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
    """W(σ) = F(σ + 1) - 1 (SPEC §1.5)."""
    return cfg.window_len


# --------------------------------------------------------------------------- span lengths
def span_lengths(cfg: SpanConfig, t_max: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Fw): int64 tensors of length >= t_max + 1 with B[t] = ceil(b_f t^ρ), Fw[t] = ceil(f_f t^ρ).

    The single routine every path uses (SPEC §1.7, Decision D1): float64 on the host, so an exact
    product stays exact (b_f = 2, ρ = ½, t = 16 gives 8). Cached per (b_f, f_f, ρ, extent, device);
    the extent is rounded up to a power of two so growing caches reuse tables.
    """
    n = 1 << max(int(t_max), 1).bit_length()
    key = ("span", float(cfg.backward_factor), float(cfg.forward_factor), float(cfg.span_power), n, str(device))
    cached = _tensor_cache.get(key)
    if cached is None:
        t = torch.arange(n + 1, dtype=torch.float64)
        power = torch.pow(t, float(cfg.span_power))
        backward = torch.ceil(float(cfg.backward_factor) * power).to(torch.int64)
        forward = torch.ceil(float(cfg.forward_factor) * power).to(torch.int64)
        cached = torch.stack([backward, forward]).to(device)
        _tensor_cache[key] = cached
    return cached[0], cached[1]


def span_bounds(cfg: SpanConfig, anchor: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                l_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Span [qstart, qend] around each anchor (SPEC §1.7); -1 where the anchor is -1.

    anchor, q, s: broadcastable int64 tensors (anchor position, query position, row start).
    qstart = max(a - B(t), s, 0); qend = min(a + Fw(t), q, L_KV - 1, sw_start(q) - 1 [if W > 0]),
    with t = max(0, q + 1 - s) — every span of one query shares the query's length.
    """
    t = (q + 1 - s).clamp_min(0)
    backward, forward = span_lengths(cfg, int(t.max()) if t.numel() else 1, device=anchor.device)
    qstart = torch.maximum(anchor - backward[t], s.clamp_min(0))
    qend = torch.minimum(anchor + forward[t], torch.clamp(q, max=l_kv - 1))
    w = cfg.window_len
    if w > 0:
        qend = torch.minimum(qend, (q - w + 1).clamp_min(0) - 1)
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


@dataclass(frozen=True)
class QueryGeometry:
    """Everything the geometry says about one query: window, stripes, spans (SPEC §1.4–1.7)."""

    query: int  # q
    start: int  # s, the row start
    t: int  # max(0, q + 1 - s)
    window: tuple[int, int] | None  # [max(sw_start, s), q], or None when empty
    backward_len: int  # B(t)
    forward_len: int  # Fw(t)
    stripes: tuple[Stripe, ...]  # i = σ+1 .. M(q + 1), nearest first

    @property
    def candidates(self) -> tuple[Stripe, ...]:
        return tuple(st for st in self.stripes if st.candidate)

    def covered(self) -> list[tuple[int, int]]:
        """The union of window and candidate spans as sorted disjoint inclusive intervals."""
        intervals = [(st.qstart, st.qend) for st in self.candidates if st.qend >= st.qstart]
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
    w = cfg.window_len
    window_start = max(max(0, q - w + 1), start)
    window = (window_start, q) if w > 0 and window_start <= q else None
    index = torch.arange(cfg.sw_index + 1, max(max_stripe(cfg, q + 1), cfg.sw_index) + 1, dtype=torch.int64)
    offsets = stripe_table(cfg, q + 1)[index]
    anchors = q + 1 - offsets
    candidate = (anchors >= start) & (anchors < l_kv)
    qs, qe = span_bounds(cfg, torch.where(candidate, anchors, -1), torch.tensor(q), torch.tensor(start), l_kv)
    stripes = tuple(Stripe(*row) for row in zip(index.tolist(), offsets.tolist(), anchors.tolist(),
                                                candidate.tolist(), qs.tolist(), qe.tolist()))
    return QueryGeometry(q, start, t, window, int(backward[t]), int(forward[t]), stripes)


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
    work (SPEC §1.8): spans of consecutive candidate stripes i, i+1 meet iff
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
