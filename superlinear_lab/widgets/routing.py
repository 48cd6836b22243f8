"""`RoutingExplorer`: what a recorded run actually routed — per layer and head, a query × key map of the chosen
spans, their anchors and the window; for one picked query, its search-score profile over stripes with the top K
marked, the gate weights and the text around each chosen span. Compare mode puts two traces (two configs, or
model vs oracle) side by side and highlights where they chose differently.

The map is aggregated in Python (`_aggregate.interval_mass`): at most `max_bins` bins per axis reach the
browser, exact for short inputs (one bin per position) and exact bin masses for long ones. It reaches the
browser as PNG layout images (and the picked query as layout shapes) over traces that never change with the
layer or head: picking a query, a head or a layer is a relayout in the browser, not a redraw of every trace.
The images of every (layer, head) are cached, and built in the background after the first view.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from superlinear_lab.trace import RoutingTrace

from ._aggregate import bin_edges, colorize, interval_mass, png_data_uri, snippet
from ._base import COLORS, View, ViewError, base_layout, with_model
from .document import Document, DocumentPane

WEIGHTS = ("count", "gate")
_TRANSPARENT = "rgba(0,0,0,0)"


@dataclass(frozen=True)
class RoutingMap:
    """Aggregated routing of one (layer, head): masses per (query bin, key bin), already normalised.

    `spans[r, j]`: mean over the recorded queries of query bin r and keys of key bin j of the number of chosen
    spans containing the key (weight "count", 0 … K) or of the gate weight of those spans (weight "gate", 0 … 1).
    `window[r, j]`: the fraction of those (query, key) pairs inside the sliding window. NaN where a query bin
    holds no recorded query.
    """

    query_edges: np.ndarray  # int64 [R + 1] query-position bin edges
    key_edges: np.ndarray  # int64 [C + 1] key-position bin edges
    spans: np.ndarray  # float32 [R, C]
    window: np.ndarray  # float32 [R, C]
    queries_per_bin: np.ndarray  # int64 [R]
    key_use: np.ndarray  # float64 [C]: Σ over recorded queries of keys-in-span mass per key bin / bin width

    @property
    def exact(self) -> bool:
        """True when every bin is one position on both axes (nothing was aggregated)."""
        return bool((np.diff(self.key_edges) == 1).all() and (np.diff(self.query_edges) == 1).all())


def routing_map(trace: RoutingTrace, layer, head: int, max_bins: int = 240, weight: str = "count") -> RoutingMap:
    """Aggregate the chosen spans and windows of (layer, head) onto a ≤ max_bins × max_bins grid."""
    if weight not in WEIGHTS:
        raise ViewError(f"weight={weight!r}: expected one of {WEIGHTS}")
    rec = trace.layer(layer)
    if not 0 <= head < rec.heads:
        raise ViewError(f"head={head}: expected 0 <= head < {rec.heads}")
    length = trace.length
    q_edges = bin_edges(length, max_bins)
    k_edges = bin_edges(length, max_bins)
    queries = trace.queries.numpy()
    rows = np.searchsorted(q_edges, queries, side="right") - 1
    n_rows = len(q_edges) - 1
    qs = rec.qstart[head].numpy().astype(np.int64)  # [Lsel, K]
    qe = rec.qend[head].numpy().astype(np.int64)
    valid = rec.qanchor[head].numpy() >= 0
    w = rec.gate[head].numpy().astype(np.float64) if weight == "gate" else np.ones(qs.shape)
    w = np.where(valid, w, 0.0)
    k = qs.shape[1]
    span_mass = interval_mass(np.repeat(rows, k), qs, qe, w, n_rows, k_edges)
    win = rec.window.numpy()
    window_mass = interval_mass(rows, win[:, 0], win[:, 1], None, n_rows, k_edges)
    counts = np.bincount(rows, minlength=n_rows)
    width = np.diff(k_edges).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = counts[:, None] * width[None, :]
        spans = np.where(counts[:, None] > 0, span_mass / norm, np.nan)
        window = np.where(counts[:, None] > 0, window_mass / norm, np.nan)
    return RoutingMap(q_edges, k_edges, spans.astype(np.float32), window.astype(np.float32), counts,
                      span_mass.sum(axis=0) / width)


def _set_options(dropdown, options: list) -> None:
    """Assign a drop-down's options only when they changed (each assignment is a message and a re-render)."""
    if list(dropdown.options) != [o if not isinstance(o, list) else tuple(o) for o in options]:
        dropdown.options = options


_SPAN_STOPS = [(0.0, "#fde0c5"), (0.3, "#f8a45e"), (1.0, "#b3470c")]
_DIFF_STOPS = [(0.0, "#2166ac"), (0.5, "#f7f7f7"), (1.0, "#b2182b")]  # blue: only B … red: only A


def _map_image(rgba: np.ndarray, length: int, axes: tuple[str, str]) -> dict:
    """A layout image of the map pixels `rgba` [R, C, 4] stretched over positions [−0.5, length − 0.5] on both axes
    of a map panel (near-equal bins: pixel r, c covers bin r, c). A layout image, not an image trace: swapping it
    is a relayout (a few ms in the browser) where an image trace makes plotly recalculate and redraw every trace."""
    return dict(source=png_data_uri(rgba), xref=axes[0], yref=axes[1], x=-0.5, y=-0.5, sizex=length, sizey=length,
                xanchor="left", yanchor="top", sizing="stretch", layer="above")


def _strip_image(values: np.ndarray, length: int, axes: tuple[str, str]) -> dict:
    """A one-row layout image (key use per key bin, grey) over the strip panel on `axes`."""
    top = float(np.max(values)) if len(values) and np.isfinite(values).any() else 0.0
    rgba = colorize(values[None, :], 0.0, max(top, 1e-12), [(0.0, "#ffffff"), (1.0, "#000000")])
    return dict(source=png_data_uri(rgba), xref=axes[0], yref=axes[1] + " domain", x=-0.5, y=1, sizex=length,
                sizey=1, xanchor="left", yanchor="top", sizing="stretch", layer="above")


def _paint_anchors(rgba: np.ndarray, m: "RoutingMap", queries: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """`rgba` with the pixel of each (query, anchor) pair (anchors [n, K], −1 = none) painted in the anchor
    colour."""
    rows = np.searchsorted(m.query_edges, queries, side="right") - 1
    ok = anchors >= 0
    cols = np.searchsorted(m.key_edges, anchors[ok], side="right") - 1
    rr = np.repeat(rows, anchors.shape[1])[ok.ravel()]
    out = rgba.copy()
    out[rr, cols] = [int(COLORS["anchor"][i:i + 2], 16) for i in (1, 3, 5)] + [255]
    return out


def _centres(edges: np.ndarray) -> np.ndarray:
    """Bin centres in position units (a one-position bin [e, e+1) is centred on e)."""
    return (edges[:-1] + edges[1:] - 1) / 2.0


class RoutingExplorer(View):
    """Layer × head selector, the aggregated query × key routing map, and the detail of one picked query.

    Args:
        trace: a `RoutingTrace`.
        tokens: display strings, one per position (default `trace.tokens`; None shows positions only).
        compare: optional second `RoutingTrace` over the same tokens (another config, or the oracle): the map
            shows A, B and A − B, and the detail lists both choices with the differences marked.
        labels: names of the two traces in compare mode.
        max_bins: bins per axis of the map (inputs up to this length are shown exactly, position by position).

    Actions: `set_layer(layer)`, `set_head(h)`, `set_query(q)` (a recorded position), `pick(key_pos, query_pos)`
    (a click on the map: the nearest recorded query; the map zooms with the modebar's buttons, not by
    dragging), `set_weight("count" | "gate")`, `set_bins(n)`.

    Example::

        ex = RoutingExplorer(trace)
        ex.set_head(1); ex.set_query(int(trace.queries[-1]))
        ex.span_report()      # rank, anchor, span, score, gate and text of each chosen span
    """

    title = "Routing explorer"

    def __init__(self, trace: RoutingTrace, tokens: list[str] | None = None, compare: RoutingTrace | None = None,
                 labels: tuple[str, str] = ("A", "B"), max_bins: int = 240) -> None:
        super().__init__()
        if not isinstance(trace, RoutingTrace):
            raise TypeError(f"trace: expected a RoutingTrace, got {type(trace).__name__}")
        if not trace.layers or trace.queries.numel() == 0:
            raise ValueError("trace: no recorded layers or queries")
        if compare is not None:
            if not isinstance(compare, RoutingTrace):
                raise TypeError(f"compare: expected a RoutingTrace, got {type(compare).__name__}")
            if compare.length != trace.length:
                raise ValueError(f"compare: length {compare.length} differs from trace length {trace.length}")
            if not set(trace.layers) & set(compare.layers):
                raise ValueError(f"compare: no layer in common (trace {trace.layers}, compare {compare.layers})")
        self.trace = trace
        self.compare = compare
        self.labels = tuple(labels)
        tokens = trace.tokens if tokens is None else tokens
        if tokens is not None and len(tokens) != trace.length:
            raise ValueError(f"tokens: {len(tokens)} entries, expected trace.length = {trace.length}")
        self.tokens = tokens
        self.document = Document(tokens) if tokens else None
        self.evidence: list[tuple[int, int]] = []  # token ranges marked as evidence (document search)
        self.max_bins = int(max_bins)
        self.layer = trace.layers[0] if compare is None else sorted(set(trace.layers) & set(compare.layers))[0]
        self.head = 0
        self.weight = "count"
        rec = trace.layer(self.layer)
        profiled = rec.profile_queries
        recorded = set(trace.queries.tolist())
        shown = [int(q) for q in profiled.tolist() if int(q) in recorded]  # a profile of a recorded query
        self.query = shown[-1] if shown else int(trace.queries[-1])
        self._maps: dict[tuple, RoutingMap] = {}
        self._agreement: dict[tuple, float] = {}
        self._map_fig: go.Figure | None = None  # the map's traces (hover layers, colour bar, legend): per frame
        self._frame_key: tuple | None = None
        self._shown: dict | None = None  # the content the map figure holds now
        self._contents: dict[tuple, dict] = {}  # (layer, head, weight, bins) -> the map's images, bands, title
        self._bands: dict[tuple, dict] = {}  # (A|B, layer) -> the window band shape
        self._prefetching: tuple | None = None

    # ------------------------------------------------------------------ derived state
    @property
    def heads(self) -> int:
        return self.trace.layer(self.layer).heads

    def routing_map(self, which: str = "A", layer: int | None = None, head: int | None = None) -> RoutingMap:
        """The cached aggregated map of (layer, head) (default: the current ones) at the current weight and bins,
        for trace A or B."""
        trace = self.trace if which == "A" else self.compare
        layer = self.layer if layer is None else layer
        head = self.head if head is None else head
        key = (which, layer, head, self.weight, self.max_bins)
        if key not in self._maps:
            self._maps[key] = routing_map(trace, layer, head, self.max_bins, self.weight)
        return self._maps[key]

    def _layers(self) -> list[int]:
        """The layers the view can show (in compare mode: those both traces recorded)."""
        return [i for i in self.trace.layers if self.compare is None or i in self.compare.layers]

    def _schedule_prefetch(self) -> None:
        """In a kernel, build the map content (images, bands, title; in compare mode also the agreement) of every
        (layer, head) for the current weight and bins while the user looks — current layer first, one per idle slot of the kernel's event loop, never
        concurrently with an action — so a head or layer change only sends it (a relayout in the browser)."""
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (scripts, tests): content is built on demand
        frame = (self.weight, self.max_bins)
        if self._prefetching == frame:
            return
        self._prefetching = frame
        layers = [self.layer] + [i for i in self._layers() if i != self.layer]
        todo = [(layer, h) for layer in layers for h in range(self.trace.layer(layer).heads)]

        def step():
            if self._prefetching != frame:
                return  # weight or bins changed: a newer prefetch runs
            while todo:
                layer, head = todo.pop(0)
                if (layer, head, *frame) not in self._contents:
                    self._map_content(layer, head)
                    if self.compare is not None and (layer, head) not in self._agreement:
                        self._agreement[(layer, head)] = self._agreement_of(layer, head)  # the summary's
                    break
            if todo:
                loop.call_later(0.05, step)
        loop.call_later(0.3, step)

    def chosen(self, which: str = "A") -> list[dict]:
        """The K slots of the current (layer, head, query) in trace A or B, best score first (invalid skipped)."""
        trace = self.trace if which == "A" else self.compare
        rec = trace.layer(self.layer)
        i = trace.query_index(self.query)
        out = []
        for k in range(rec.num_spans):
            anchor = int(rec.qanchor[self.head, i, k])
            if anchor < 0:
                continue
            out.append(dict(rank=k + 1, anchor=anchor, qstart=int(rec.qstart[self.head, i, k]),
                            qend=int(rec.qend[self.head, i, k]), score=float(rec.values[self.head, i, k]),
                            gate=float(rec.gate[self.head, i, k])))
        return out

    def profile(self):
        """(anchors, scores) of every candidate stripe of the current query and head, or None if the trace holds
        no full profile for this query."""
        rec = self.trace.layer(self.layer)
        pq = rec.profile_queries
        if pq.numel() == 0:
            return None
        j = int(np.searchsorted(pq.numpy(), self.query))
        if j >= pq.numel() or int(pq[j]) != self.query:
            return None
        anchors = rec.stripe_anchors[j].numpy()
        scores = rec.stripe_values[self.head, j].numpy()
        keep = (anchors >= 0) & np.isfinite(scores)
        return anchors[keep], scores[keep]

    def span_report(self) -> list[dict]:
        """Each chosen span of the current query: rank, anchor, span, score, gate, text (and, in compare mode,
        `in_other`: whether trace B chose the same anchor)."""
        rows = self.chosen("A")
        other = {r["anchor"] for r in self.chosen("B")} if self.compare is not None else None
        for r in rows:
            r["text"] = snippet(self.tokens, r["qstart"], r["qend"], limit=90)
            r["anchor_text"] = snippet(self.tokens, r["anchor"], r["anchor"], limit=20)
            if other is not None:
                r["in_other"] = r["anchor"] in other
        return rows

    def agreement(self) -> float:
        """Compare mode: fraction of recorded queries (common to both traces) whose chosen anchor sets are equal
        for the current (layer, head)."""
        if self.compare is None:
            raise ViewError("agreement needs a compare trace")
        key = (self.layer, self.head)
        if key not in self._agreement:
            self._agreement[key] = self._agreement_of(*key)
        return self._agreement[key]

    def _agreement_of(self, layer: int, head: int) -> float:
        a, b = self.trace, self.compare
        common, ia, ib = np.intersect1d(a.queries.numpy(), b.queries.numpy(), return_indices=True)
        if len(common) == 0:
            return float("nan")
        anchors_a = a.layer(layer).qanchor[head].numpy()[ia]
        anchors_b = b.layer(layer).qanchor[head].numpy()[ib]
        k = max(anchors_a.shape[1], anchors_b.shape[1])  # different K: pad with invalid slots (-1)
        pad = lambda x: np.sort(np.pad(x, ((0, 0), (0, k - x.shape[1])), constant_values=-1), axis=1)  # noqa: E731
        return float((pad(anchors_a) == pad(anchors_b)).all(axis=1).mean())

    # ------------------------------------------------------------------ actions
    def set_layer(self, layer) -> bool:
        """Select an attention layer (index or 'layers.<i>.routing')."""
        def action():
            index = self.trace.layer(layer).index
            if self.compare is not None:
                self.compare.layer(index)
            heads = self.trace.layer(index).heads
            self.layer = index
            self.head = min(self.head, heads - 1)
        return self._act(action)

    def set_head(self, head: int) -> bool:
        """Select a query head 0 … H_Q − 1."""
        def action():
            if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 0 <= head < self.heads:
                raise ViewError(f"head={head!r}: expected an int in 0 … {self.heads - 1}")
            self.head = int(head)
        return self._act(action)

    def set_query(self, query: int) -> bool:
        """Select a recorded query position (see `trace.queries`)."""
        def action():
            if isinstance(query, bool) or not isinstance(query, (int, np.integer)):
                raise ViewError(f"query={query!r}: expected an int position")
            self.trace.query_index(int(query))
            if self.compare is not None:
                self.compare.query_index(int(query))
            self.query = int(query)
        return self._act(action)

    def set_query_index(self, index: int) -> bool:
        """Select the `index`-th recorded query (what the query slider moves)."""
        def action():
            n = self.trace.queries.numel()
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
                raise ViewError(f"query index {index!r}: expected an int in 0 … {n - 1}")
            query = int(self.trace.queries[index])
            if self.compare is not None:
                self.compare.query_index(query)
            self.query = query
        return self._act(action)

    def pick(self, key_pos: float, query_pos: float) -> bool:
        """A click on the map at (key, query): select the recorded query nearest to `query_pos`."""
        def action():
            query = self._nearest_query(query_pos)
            if self.compare is not None:
                self.compare.query_index(query)
            self.query = query
        return self._act(action)

    def _nearest_query(self, position: float) -> int:
        queries = self.trace.queries.numpy()
        j = int(np.clip(np.searchsorted(queries, position), 0, len(queries) - 1))
        if j > 0 and abs(queries[j - 1] - position) <= abs(queries[j] - position):
            j -= 1
        return int(queries[j])

    def pick_token(self, position: int) -> bool:
        """A click on a token of the document pane: select the recorded query nearest to `position`."""
        def action():
            if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or \
                    not 0 <= position < self.trace.length:
                raise ViewError(f"token position {position!r}: expected an int in 0 … {self.trace.length - 1}")
            query = self._nearest_query(int(position))
            if self.compare is not None:
                self.compare.query_index(query)
            self.query = query
        return self._act(action)

    def _find(self, text: str) -> list[tuple[int, int]]:
        if self.document is None:
            raise ViewError("search needs the trace's tokens (this trace has none)")
        found = self.document.find(text)
        if not found:
            raise ViewError(f"search text {text!r}: not found in the document")
        return found

    def mark_evidence(self, text: str) -> bool:
        """Mark every occurrence of `text` in the document as evidence (highlighted in the text and the map)."""
        def action():
            self.evidence = self._find(text)
        return self._act(action)

    def clear_evidence(self) -> bool:
        """Remove the evidence marks."""
        def action():
            self.evidence = []
        return self._act(action)

    def jump_to(self, text: str) -> bool:
        """Select the recorded query nearest to the end of the first occurrence of `text` (the text then shows
        around it)."""
        def action():
            _, end = self._find(text)[0]
            query = self._nearest_query(end)
            if self.compare is not None:
                self.compare.query_index(query)
            self.query = query
        return self._act(action)

    def document_highlights(self) -> dict:
        """What the document pane highlights for the current state: query, its window, its chosen spans (A) and
        the evidence (token ranges, inclusive)."""
        rec = self.trace.layer(self.layer)
        lo, hi = (int(v) for v in rec.window[self.trace.query_index(self.query)])
        return dict(query=self.query, window=(lo, hi) if lo >= 0 else None,
                    spans=[(r["qstart"], r["qend"]) for r in self.chosen("A")], evidence=list(self.evidence))

    def set_weight(self, weight: str) -> bool:
        """Weight the map by span count ("count") or by gate weight ("gate")."""
        def action():
            if weight not in WEIGHTS:
                raise ViewError(f"weight={weight!r}: expected one of {WEIGHTS}")
            self.weight = weight
        return self._act(action)

    def set_bins(self, max_bins: int) -> bool:
        """Bins per axis of the map (16 … 1024)."""
        def action():
            if isinstance(max_bins, bool) or not isinstance(max_bins, (int, np.integer)) or not 16 <= max_bins <= 1024:
                raise ViewError(f"max_bins={max_bins!r}: expected an int in 16 … 1024")
            self.max_bins = int(max_bins)
        return self._act(action)

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        rec = self.trace.layer(self.layer)
        m = self.routing_map("A")
        parts = [f"{rec.name}, head {self.head}", f"query {self.query:,}",
                 f"{self.trace.queries.numel():,} recorded queries over {self.trace.length:,} tokens",
                 "exact map" if m.exact else
                 f"map aggregated to {len(m.query_edges) - 1}×{len(m.key_edges) - 1} bins"]
        if self.compare is not None:
            parts.append(f"{self.labels[0]} and {self.labels[1]} choose the same anchors for "
                         f"{self.agreement():.1%} of queries")
        return with_model(" · ".join(parts), self.trace)

    def panels_html(self) -> list[str]:
        rows = self.span_report()
        head = ("<tr><th>#</th><th>anchor</th><th>span</th><th>score</th><th>gate</th>"
                + (f"<th>in {html.escape(self.labels[1])}?</th>" if self.compare is not None else "")
                + "<th>text of the span</th></tr>")
        body = []
        for r in rows:
            mark = ""
            style = ""
            if self.compare is not None:
                mark = "<td>yes</td>" if r["in_other"] else f"<td style='color:{COLORS['miss']}'>no</td>"
                style = "" if r["in_other"] else " style='background:#fdecea'"
            body.append(f"<tr{style}><td>{r['rank']}</td><td>{r['anchor']:,}</td>"
                        f"<td>[{r['qstart']:,}, {r['qend']:,}]</td><td>{r['score']:.3f}</td>"
                        f"<td>{r['gate']:.3f}</td>{mark}<td><code>{html.escape(r['text'])}</code></td></tr>")
        if not body:
            body.append("<tr><td colspan='7'>no chosen span (all slots invalid: window-only attention)</td></tr>")
        title = (f"<b>Chosen spans of query {self.query:,}</b> "
                 f"— text up to it: <code>…{html.escape(snippet(self.tokens, max(0, self.query - 24), self.query, 40))}</code>"
                 if self.tokens else f"<b>Chosen spans of query {self.query:,}</b>")
        if self.compare is not None:
            b_anchors = ", ".join(f"{r['anchor']:,}" for r in self.chosen("B")) or "none"
            title += f" · {html.escape(self.labels[1])} chose anchors {b_anchors}"
        table = (f"<table class='sl-table' style='border-collapse:collapse;font-size:12px'>{head}{''.join(body)}"
                 "</table>").replace("<td", "<td style='padding:2px 10px 2px 0;vertical-align:top;white-space:nowrap'").replace(
                     "<th>", "<th style='padding:2px 10px 2px 0;text-align:left'>")
        return [f"<div class='sl-spans'>{title}{table}</div>"]

    # ------------------------------------------------------------------ figures
    def _map_pixels(self, which: str, layer: int, head: int) -> np.ndarray:
        """uint8 RGBA [R, C, 4] of one map panel: the chosen-span mass in orange (empty cells transparent, so the
        window band shows through) and a sample of the anchors (≤ 120 queries × K) as green pixels."""
        m = self.routing_map(which, layer, head)
        zmax = float(self.trace.layer(layer).num_spans) if self.weight == "count" else 1.0
        rgba = colorize(np.where(m.spans > 0, m.spans, np.nan), 0.0, zmax, _SPAN_STOPS)
        trace = self.trace if which == "A" else self.compare
        queries = trace.queries.numpy()
        pick = np.unique(np.linspace(0, len(queries) - 1, min(len(queries), 120)).astype(int))
        return _paint_anchors(rgba, m, queries[pick], trace.layer(layer).qanchor[head].numpy()[pick])

    def _map_content(self, layer: int, head: int) -> dict:
        """What the map shows of (layer, head) at the current weight and bins — its images (panels and key-use
        strips), window bands and title — cached (and prefetched in a kernel: `_schedule_prefetch`)."""
        key = (layer, head, self.weight, self.max_bins)
        if key in self._contents:
            return self._contents[key]
        rec = self.trace.layer(layer)
        length = self.trace.length
        m = self.routing_map("A", layer, head)
        if self.compare is None:
            images = [_map_image(self._map_pixels("A", layer, head), length, ("x", "y")),
                      _strip_image(m.key_use, length, ("x2", "y2"))]
            title = (f"{rec.name} · head {head}: keys each query attends — blue: window, orange: "
                     f"top-{rec.num_spans} spans, green: anchors (sample), black/●: the picked query")
        else:
            mb = self.routing_map("B", layer, head)
            a, b = self.labels
            diff = m.spans - mb.spans
            lim = max(float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0, 1e-9)
            diff_rgba = colorize(np.where(np.abs(diff) > 1e-9, diff, np.nan), -lim, lim, _DIFF_STOPS)
            images = [_map_image(self._map_pixels("A", layer, head), length, ("x", "y")),
                      _map_image(self._map_pixels("B", layer, head), length, ("x2", "y2")),
                      _map_image(diff_rgba, length, ("x3", "y3"))]
            images += [_strip_image(use, length, (f"x{i}", f"y{i}"))
                       for i, use in ((4, m.key_use), (5, mb.key_use), (6, m.key_use))]
            title = f"{rec.name} · head {head}: {a} vs {b} (red: only {a}, blue: only {b})"
        bands = [self._window_band("A", "xy", layer)]
        if self.compare is not None:
            bands.append(self._window_band("B", "x2y2", layer))
        content = dict(images=images, bands=[band for band in bands if band], title=title)
        self._contents[key] = content
        return content

    def _window_band(self, which: str, axis: str, layer: int) -> dict:
        """The sliding window of every recorded query as one filled polygon in (key, query) coordinates."""
        trace = self.trace if which == "A" else self.compare
        win = trace.layer(layer).window.numpy()
        queries = trace.queries.numpy()
        keep = win[:, 0] >= 0
        if not keep.any():
            return {}
        q, lo, hi = queries[keep], win[keep, 0], win[keep, 1]
        # vertices only where a bound stops moving with the query (the band is straight in between): a few
        # dozen points instead of one per query, so the shape redraws fast
        dq = np.diff(q)
        bend = np.flatnonzero((np.diff(lo) != dq) | (np.diff(hi) != dq))
        pick = np.unique(np.concatenate([bend, bend + 1, [0, len(q) - 1]]))
        if len(pick) > 600:  # irregular windows: fall back to a sample
            pick = np.unique(np.concatenate([np.linspace(0, len(q) - 1, 600).astype(int), [len(q) - 1]]))
        left = [f"{lo[i] - 0.5:g},{q[i]:g}" for i in pick]
        right = [f"{hi[i] + 0.5:g},{q[i]:g}" for i in pick[::-1]]
        return dict(type="path", path="M" + "L".join(left + right) + "Z", xref=axis.split("y")[0],
                    yref="y" + axis.split("y")[1], layer="below", line=dict(width=0),
                    fillcolor="rgba(76,120,168,0.30)")

    def _overlay_shapes(self) -> list[dict]:
        """The picked query's chosen spans (thick lines) and anchors (pixel-sized circles), per panel: layout
        shapes, so picking another query only redraws shapes (no trace is recalculated in the browser)."""
        shapes = []
        panels = [("A", "xy")] + ([("B", "x2y2")] if self.compare is not None else [])
        for _, axis in panels:  # evidence: key columns in green
            for a, b in self.evidence:
                shapes.append(dict(type="rect", xref=axis.split("y")[0], yref="y" + axis.split("y")[1] + " domain",
                                   x0=a - 0.5, x1=b + 0.5, y0=0, y1=1, layer="below", line=dict(width=0),
                                   fillcolor="rgba(84,162,75,0.35)"))
        for which, axis in panels:
            xref, yref = axis.split("y")[0], "y" + axis.split("y")[1]
            color = COLORS["miss"] if which == "B" else COLORS["query"]
            for r in self.chosen(which):
                shapes.append(dict(type="line", xref=xref, yref=yref, x0=r["qstart"] - 0.5, x1=r["qend"] + 0.5,
                                   y0=self.query, y1=self.query, line=dict(color=color, width=5)))
                shapes.append(dict(type="circle", xref=xref, yref=yref, xsizemode="pixel", ysizemode="pixel",
                                   xanchor=r["anchor"], yanchor=self.query, x0=-5, x1=5, y0=-5, y1=5,
                                   fillcolor=COLORS["anchor"], line=dict(color="black", width=1)))
        return shapes

    def _hover_layers(self, m: RoutingMap, which: str, axes: tuple[str, str], strip_axes: tuple[str, str]
                      ) -> list[dict]:
        """Transparent traces that carry the hover labels of one panel — the position over the map, the text of
        each key bin over the strip — and never change with the layer or head (the colours are layout images)."""
        zero = np.zeros((len(m.query_edges) - 1, len(m.key_edges) - 1), dtype=np.uint8)
        clear = [[0, _TRANSPARENT], [1, _TRANSPARENT]]
        text = [f"keys {a:,}–{b - 1:,}: {html.escape(snippet(self.tokens, a, b - 1, 48))}" if self.tokens
                else f"keys {a:,}–{b - 1:,}" for a, b in zip(m.key_edges[:-1], m.key_edges[1:])]
        return [dict(type="heatmap", x=_centres(m.key_edges), y=_centres(m.query_edges), z=zero, colorscale=clear,
                     showscale=False, name=which, xaxis=axes[0], yaxis=axes[1],
                     hovertemplate=f"keys ≈ %{{x:.0f}} · queries ≈ %{{y:.0f}}<extra>{html.escape(which)}</extra>"),
                dict(type="heatmap", x=_centres(m.key_edges), y=[0], z=zero[:1], colorscale=clear, showscale=False,
                     name="key use", hovertext=[text], hoverinfo="text", xaxis=strip_axes[0], yaxis=strip_axes[1])]

    def figures(self) -> list[go.Figure]:
        return [self._map_figure(), self._detail_figure()]

    def _map_figure(self) -> go.Figure:
        """The map: its traces (hover layers, colour bar, legend) are built once per (weight, bins, K); what the
        layer and head change (images, window band, title) and the picked query (shapes) are layout, so the
        browser swaps them with a relayout."""
        rec = self.trace.layer(self.layer)
        frame = (self.weight, self.max_bins, rec.num_spans)
        if self._frame_key != frame:
            fig = self._build_map_figure()
            # plotly.js builds CSS selectors from uids: letters, digits, '-' and '_' only.
            tag = re.sub(r"[^A-Za-z0-9_-]", "-", "map-" + "-".join(str(x) for x in frame))
            for i, t in enumerate(fig.data):
                t.uid = f"{tag}-{i}"  # the pane skips traces whose uid it has sent (no re-serialisation)
            self._map_fig, self._frame_key, self._shown = fig, frame, None
        content = self._map_content(self.layer, self.head)
        layout = self._map_fig.layout
        if self._shown is not content:  # assigned only when they change (plotly validates every assignment)
            layout.images, layout.title.text, self._shown = content["images"], content["title"], content
        layout.shapes = content["bands"] + self._overlay_shapes()
        self._schedule_prefetch()
        return self._map_fig

    def _build_map_figure(self) -> go.Figure:
        """The map panels (A; or A, B and A − B) over a key-use strip, built as one dict (traces and axes only)."""
        m = self.routing_map("A")
        rec = self.trace.layer(self.layer)
        top, strip = [0.0886, 1.0], [0.0, 0.0686]  # row heights 0.93 / 0.07 with a 0.02 gap
        full_x = [-0.5, self.trace.length - 0.5]
        full_y = [self.trace.length - 0.5, -0.5]  # reversed; fixed, so shape overlays never trigger autorange
        unit = "spans per key" if self.weight == "count" else "gate mass"
        zmax = float(rec.num_spans) if self.weight == "count" else 1.0
        # the image has no colour bar and the anchors are pixels: invisible markers carry both
        data = [dict(type="scatter", x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                     name=unit, marker=dict(color=[0, zmax], cmin=0, cmax=zmax, showscale=True, size=0,
                                            colorscale=[[f, c] for f, c in _SPAN_STOPS],
                                            colorbar=dict(title=dict(text=unit, side="right"), thickness=10,
                                                          len=0.6, y=0.6))),
                dict(type="scatter", x=[None], y=[None], mode="markers", name="anchors (sample)",
                     marker=dict(color=COLORS["anchor"], size=6, symbol="square"), hoverinfo="skip")]
        layout = {}
        if self.compare is None:
            data += self._hover_layers(m, "A", ("x", "y"), ("x2", "y2"))
            layout.update(xaxis=dict(domain=[0, 1], anchor="y", matches="x2", showticklabels=False),
                          yaxis=dict(domain=top, anchor="x", title=dict(text="query position")),
                          xaxis2=dict(domain=[0, 1], anchor="y2"), yaxis2=dict(domain=strip, anchor="x2"))
            strip_axes = ["2"]
            height = 560
        else:
            a, b = self.labels
            cols = [[0.0, 0.3067], [0.3467, 0.6533], [0.6933, 1.0]]
            for i, name in ((1, a), (2, b), (3, f"{a} − {b}")):
                n = "" if i == 1 else str(i)
                data += self._hover_layers(m, name, (f"x{n}", f"y{n}"), (f"x{i + 3}", f"y{i + 3}"))
            for i, dom in enumerate(cols, start=1):
                n, s_ = ("" if i == 1 else str(i)), str(i + 3)
                layout[f"xaxis{n}"] = dict(domain=dom, anchor=f"y{n}", matches=f"x{s_}", showticklabels=False)
                layout[f"yaxis{n}"] = dict(domain=top, anchor=f"x{n}", **({} if i == 1 else dict(
                    matches="y", showticklabels=False)))
                layout[f"xaxis{s_}"] = dict(domain=dom, anchor=f"y{s_}")
                layout[f"yaxis{s_}"] = dict(domain=strip, anchor=f"x{s_}")
            layout["yaxis"]["title"] = dict(text="query position")
            layout["annotations"] = [dict(text=t, xref="paper", yref="paper", x=(d[0] + d[1]) / 2, y=1.0,
                                          yanchor="bottom", showarrow=False, font=dict(size=13))
                                     for t, d in zip((a, b, f"{a} − {b}"), cols)]
            strip_axes = ["4", "5", "6"]
            height = 520
        for name, axis in layout.items():
            if name.startswith("xaxis"):
                axis.update(range=full_x, autorange=False, showgrid=False)
            elif name.startswith("yaxis") and name[5:] not in strip_axes:
                # scaleanchor False: the images never force square pixels
                axis.update(range=full_y, autorange=False, scaleanchor=False)
        for n in strip_axes:
            layout[f"yaxis{n}"].update(showticklabels=False, showgrid=False, range=[-0.5, 0.5], autorange=False)
        middle = strip_axes[len(strip_axes) // 2]
        layout[f"xaxis{middle}"]["title"] = dict(
            text="key position · grey strip: how often each key is used (hover: its text)")
        base = base_layout("", height=height)
        base.update(layout, legend=dict(orientation="h", yanchor="top", y=-0.08, x=0, xanchor="left"),
                    margin=dict(l=70, r=20, t=60, b=60), clickmode="event")
        return go.Figure(dict(data=data, layout=base))

    def _detail_figure(self) -> go.Figure:
        """Score profile of the picked query (stripes, top-K, B's choice) and its gate weights. Built as one
        dict and validated once (plotly's incremental figure API costs ~10x more per query step)."""
        rec = self.trace.layer(self.layer)
        chosen = self.chosen("A")
        prof = self.profile()
        data, shapes, annotations = [], [], []
        if prof is not None:
            anchors, scores = prof
            order = np.argsort(anchors)
            data.append(dict(type="scatter", x=anchors[order], y=scores[order], mode="lines+markers",
                             name="stripe scores", line=dict(color=COLORS["muted"], width=1),
                             marker=dict(color="#888", size=4),
                             hovertemplate="anchor %{x}<br>score %{y:.3f}<extra></extra>"))
            if chosen:  # the K-th chosen score: only drawn when the profile of this very query is shown
                kth = min(r["score"] for r in chosen)
                shapes.append(dict(type="line", xref="x domain", yref="y", x0=0, x1=1, y0=kth, y1=kth,
                                   line=dict(color=COLORS["span"], dash="dot", width=1), name="kth-score"))
        else:
            data.append(dict(type="scatter", x=[], y=[], mode="lines+markers", name="stripe scores"))
            n_prof = rec.profile_queries.numel()
            annotations.append(dict(
                text=(f"full profile not recorded for this query (pick one of the {n_prof} profiled: "
                      "see the 'profiled' menu)" if n_prof
                      else "no full stripe profile in this trace: only the chosen top-K are shown"),
                xref="x domain", yref="y domain", x=0.5, y=0.5, showarrow=False, font=dict(color="#666")))
        data.append(dict(
            type="scatter", x=[r["anchor"] for r in chosen], y=[r["score"] for r in chosen], mode="markers+text",
            name=f"top-{rec.num_spans} (chosen)", text=[f"#{r['rank']}" for r in chosen], textposition="top center",
            marker=dict(color=COLORS["span"], size=12, line=dict(color="black", width=1)),
            hovertext=[f"#{r['rank']} anchor {r['anchor']:,}: {html.escape(snippet(self.tokens, r['qstart'], r['qend']))}"
                       for r in chosen], hoverinfo="text"))
        other = self.chosen("B") if self.compare is not None else []
        if self.compare is not None:
            data.append(dict(type="scatter", x=[r["anchor"] for r in other], y=[r["score"] for r in other],
                             mode="markers", name=f"{self.labels[1]}'s choice",
                             marker=dict(color=COLORS["miss"], size=9, symbol="x"),
                             hovertemplate="anchor %{x}<br>score %{y:.3f}<extra></extra>"))
        data.append(dict(type="bar", x=[f"#{r['rank']}" for r in chosen], y=[r["gate"] for r in chosen],
                         name="gate", marker_color=COLORS["span"], showlegend=False, xaxis="x2", yaxis="y2",
                         hovertext=[f"anchor {r['anchor']:,}, span [{r['qstart']:,}, {r['qend']:,}]"
                                    for r in chosen], hoverinfo="text+y"))
        # every marker drawn in the score panel counts: A's choice, the profile and, in compare mode, B's choice
        scores = ([r["score"] for r in chosen] + ([] if prof is None else prof[1].tolist())
                  + [r["score"] for r in other])
        scores = [v for v in scores if np.isfinite(v)]
        score_axis = dict(title=dict(text="score ⟨Q1, K(anchor)⟩"), anchor="x")
        if scores:  # room above the top marker for its "#1" label
            lo, hi = min(scores), max(scores)
            pad = 0.15 * max(hi - lo, 1e-6)
            score_axis["range"] = [lo - pad, hi + 2 * pad]
        for text, x in (("search score of every candidate stripe", 0.36), ("gate weights", 0.86)):
            annotations.append(dict(text=text, xref="paper", yref="paper", x=x, y=1.0, yanchor="bottom",
                                    showarrow=False, font=dict(size=13)))
        title = f"Query {self.query:,} · {rec.name} · head {self.head}"
        layout = base_layout(title, height=300)
        layout.update(margin=dict(l=70, r=20, t=70, b=45), legend=dict(y=1.12, orientation="h", yanchor="bottom",
                                                                       xanchor="right", x=1.0),
                      xaxis=dict(domain=[0, 0.72], anchor="y", title=dict(text="anchor position"),
                                 range=[-0.03 * self.query - 1, 1.03 * self.query + 1]),
                      yaxis=score_axis, xaxis2=dict(domain=[0.8, 1.0], anchor="y2", type="category"),
                      yaxis2=dict(domain=[0, 1], anchor="x2", range=[0, 1]),
                      shapes=shapes, annotations=annotations)
        return go.Figure(dict(data=data, layout=layout))

    # ------------------------------------------------------------------ widget controls
    def _wire_figures(self, widgets) -> None:
        # a click anywhere on a map panel (also on cells no span reached) picks the nearest recorded query
        panels = {"xy", "x2y2", "x3y3"}
        widgets[0].on_area_click(lambda subplot, x, y: self.pick(x, y) if subplot in panels else None)

    def _build_extras(self) -> list:
        """The document pane (click a token: pick it as the query) with a search box (mark as evidence, jump)."""
        if self.document is None:
            return []
        import ipywidgets as w

        pane = DocumentPane(self.document)
        pane.on_pick(self.pick_token)
        search = w.Text(placeholder="search the text", layout=w.Layout(width="320px"))
        mark = w.Button(description="mark as evidence", icon="highlighter", layout=w.Layout(width="150px"))
        jump = w.Button(description="jump to it", icon="search", layout=w.Layout(width="110px"))
        clear = w.Button(description="clear evidence", layout=w.Layout(width="130px"))
        mark.on_click(lambda _: self.mark_evidence(search.value))
        jump.on_click(lambda _: self.jump_to(search.value))
        clear.on_click(lambda _: self.clear_evidence())
        self.subscribe(lambda: pane.show(**self.document_highlights()))
        pane.show(**self.document_highlights())
        self._document_pane = pane
        self._controls_search = dict(search=search, mark=mark, jump=jump, clear=clear)
        box = w.VBox([w.HBox([search, mark, jump, clear]), pane])
        box.add_class("sl-document-box")
        return [box]

    def _build_controls(self):
        import ipywidgets as w

        style = {"description_width": "60px"}
        layer = w.Dropdown(options=[(self.trace.layer(i).name, i) for i in self.trace.layers
                                    if self.compare is None or i in self.compare.layers],
                           value=self.layer, description="layer", style=style, layout=w.Layout(width="230px"))
        head = w.Dropdown(options=list(range(self.heads)), value=self.head, description="head", style=style,
                          layout=w.Layout(width="140px"))
        n = self.trace.queries.numel()
        query = w.IntSlider(value=int(np.searchsorted(self.trace.queries.numpy(), self.query)), min=0, max=n - 1,
                            description="query", readout=False, continuous_update=False, style=style,
                            layout=w.Layout(width="360px"))
        query_label = w.Label()
        profiled = self.trace.layer(self.layer).profile_queries.tolist()
        prof = w.Dropdown(options=[("—", -1)] + [(f"{q:,}", q) for q in profiled], value=-1,
                          description="profiled", style={"description_width": "60px"},
                          layout=w.Layout(width="190px"), disabled=not profiled)
        weight = w.ToggleButtons(options=[("span count", "count"), ("gate weight", "gate")], value=self.weight,
                                 style={"button_width": "100px"})
        syncing = [False]

        def sync():
            syncing[0] = True
            try:
                layer.value = self.layer
                _set_options(head, list(range(self.heads)))
                head.value = self.head
                query.value = int(np.searchsorted(self.trace.queries.numpy(), self.query))
                query_label.value = f"position {self.query:,}"
                weight.value = self.weight
                plist = self.trace.layer(self.layer).profile_queries.tolist()
                _set_options(prof, [("—", -1)] + [(f"{q:,}", q) for q in plist])
                prof.value = self.query if self.query in plist else -1
            finally:
                syncing[0] = False

        def guarded(fn):
            return lambda ch: None if syncing[0] else fn(ch["new"])

        layer.observe(guarded(self.set_layer), names="value")
        head.observe(guarded(self.set_head), names="value")
        query.observe(guarded(self.set_query_index), names="value")
        prof.observe(guarded(lambda v: v >= 0 and self.set_query(v)), names="value")
        weight.observe(guarded(self.set_weight), names="value")
        self.subscribe(sync)
        sync()
        self._controls = dict(layer=layer, head=head, query=query, profiled=prof, weight=weight)
        return w.VBox([w.HBox([layer, head, weight]), w.HBox([query, query_label, prof])])
