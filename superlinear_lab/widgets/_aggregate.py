"""Aggregation of long sequences before anything reaches the browser: interval masses on a (query bin × key bin)
grid, computed exactly in O(N log N + bins) with no L×L array, and token-text snippets for hover labels.

A query × key map over 64K tokens would be 4·10⁹ cells; the views instead draw at most a few hundred bins per
axis. The mass of a bin is exact (how many keys of the bin each interval contains, summed), so averages and
"was anything reached here" survive aggregation.
"""
from __future__ import annotations

import numpy as np


def bin_edges(length: int, max_bins: int) -> np.ndarray:
    """int64 edges e_0 = 0 < e_1 < … < e_n = length with n = min(length, max_bins) near-equal bins.

    When length <= max_bins every bin holds one position, so the map is exact, position by position.
    """
    if length < 1:
        raise ValueError(f"length={length}: expected >= 1")
    if max_bins < 1:
        raise ValueError(f"max_bins={max_bins}: expected >= 1")
    n = min(length, max_bins)
    return np.unique(np.linspace(0, length, n + 1).round().astype(np.int64))


def interval_mass(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, weights: np.ndarray | None,
                  n_rows: int, edges: np.ndarray) -> np.ndarray:
    """float64 [n_rows, len(edges) - 1]: Σ over intervals of row r of weight · |[start, end] ∩ [e_j, e_{j+1})|.

    Intervals are inclusive integer ranges; only keys inside [e_0, e_last) count, and empty intervals
    (end < start) or rows outside [0, n_rows) contribute nothing. With F_r(x) = Σ w·(relu(x − start) − relu(x − end − 1)), the mass of row r below x, and the
    interval end points p (weight +w at start, −w at end + 1): F_r(e_j) = e_j·Σ_{p < e_j} w − Σ_{p < e_j} w·p.
    Both sums are bincounts over (row, first edge above p) followed by a cumulative sum over edges: O(N log C).
    """
    rows = np.asarray(rows, dtype=np.int64).ravel()
    starts = np.asarray(starts, dtype=np.int64).ravel()
    ends = np.asarray(ends, dtype=np.int64).ravel()
    w = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    keep = (ends >= starts) & (rows >= 0) & (rows < n_rows) & (w != 0)
    rows, starts, ends, w = rows[keep], starts[keep], ends[keep], w[keep]
    edges = np.asarray(edges, dtype=np.int64)
    n_edges = len(edges)
    points = np.concatenate([starts, ends + 1])
    sign = np.concatenate([w, -w])
    point_rows = np.concatenate([rows, rows])
    first = np.searchsorted(edges, points, side="right")  # first edge index j with e_j > p
    inside = first < n_edges
    flat = point_rows[inside] * n_edges + first[inside]
    size = n_rows * n_edges
    weight_sum = np.bincount(flat, weights=sign[inside], minlength=size).reshape(n_rows, n_edges)
    moment_sum = np.bincount(flat, weights=(sign * points)[inside], minlength=size).reshape(n_rows, n_edges)
    below = edges[None, :] * np.cumsum(weight_sum, axis=1) - np.cumsum(moment_sum, axis=1)
    return np.diff(below, axis=1)


def snippet(tokens: list[str] | None, start: int, end: int, limit: int = 60) -> str:
    """Text of tokens [start, end] (inclusive), shortened in the middle to about `limit` characters, with
    newlines and tabs made visible; '' without tokens."""
    if not tokens or end < start:
        return ""
    start, end = max(start, 0), min(end, len(tokens) - 1)
    if end - start + 1 > 4 * limit:  # avoid joining megabytes to show 60 characters
        head = "".join(tokens[start:start + limit])
        tail = "".join(tokens[end - limit + 1:end + 1])
        text = head[: limit // 2] + " … " + tail[-(limit // 2):]
    else:
        text = "".join(tokens[start:end + 1])
        if len(text) > limit:
            text = text[: limit // 2] + " … " + text[-(limit // 2):]
    return text.replace("\n", "⏎").replace("\t", "⇥")
