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


# The one token-display rule (hover text, tables, the document pane): a newline is "⏎", a tab "⇥", a carriage
# return "␍" — whether the trace holds the raw character (demo traces) or the tokenizer's escaped display string
# ("\\n", from `ByteTokenizer.token_strings`).
_SHOWN = {"\n": "⏎", "\\n": "⏎", "\t": "⇥", "\\t": "⇥", "\r": "␍", "\\r": "␍"}
_RAW = {"\\n": "\n", "\\t": "\t", "\\r": "\r"}


def display_token(token: str) -> str:
    """How one token is shown: escaped or raw whitespace made visible (see `_SHOWN`), other text unchanged."""
    shown = _SHOWN.get(token)
    if shown is not None:
        return shown
    return token.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")


def raw_token(token: str) -> str:
    """The text a token stands for (an escaped display string such as "\\n" back to a newline), for search."""
    return _RAW.get(token, token)


def snippet(tokens: list[str] | None, start: int, end: int, limit: int = 60) -> str:
    """Text of tokens [start, end] (inclusive), shortened in the middle to about `limit` characters, each token
    shown by `display_token`; '' without tokens."""
    if not tokens or end < start:
        return ""
    start, end = max(start, 0), min(end, len(tokens) - 1)
    if end - start + 1 > 4 * limit:  # avoid joining megabytes to show 60 characters
        head = "".join(display_token(t) for t in tokens[start:start + limit])
        tail = "".join(display_token(t) for t in tokens[end - limit + 1:end + 1])
        return head[: limit // 2] + " … " + tail[-(limit // 2):]
    text = "".join(display_token(t) for t in tokens[start:end + 1])
    if len(text) > limit:
        text = text[: limit // 2] + " … " + text[-(limit // 2):]
    return text


def colorize(values: np.ndarray, vmin: float, vmax: float, stops: list[tuple[float, str]]) -> np.ndarray:
    """uint8 RGBA [*values.shape, 4]: `values` mapped linearly from [vmin, vmax] through the colour `stops`
    ((fraction, "#rrggbb") pairs, fractions ascending from 0 to 1); NaN becomes fully transparent."""
    v = np.asarray(values, dtype=np.float64)
    t = np.clip((v - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    at = [f for f, _ in stops]
    rgb = [[int(c[i:i + 2], 16) for i in (1, 3, 5)] for _, c in stops]
    out = np.empty(v.shape + (4,), dtype=np.uint8)
    for ch in range(3):
        out[..., ch] = np.interp(np.nan_to_num(t), at, [c[ch] for c in rgb]).round().astype(np.uint8)
    out[..., 3] = np.where(np.isnan(v), 0, 255)
    return out


def png_data_uri(rgba: np.ndarray) -> str:
    """A `data:image/png;base64,…` URI of an uint8 RGBA image [H, W, 4] (no imaging library needed)."""
    import base64
    import struct
    import zlib

    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    h, w, _ = rgba.shape
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgba.reshape(h, w * 4)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
