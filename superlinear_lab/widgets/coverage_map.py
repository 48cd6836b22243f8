"""`CoverageMap`: per layer × head, the fraction of key positions a trace ever reached and how far back each head
looks; for a chosen head, a per-position histogram of how often each key was attended (unreached keys in red).

Geometry guarantees that every key is *reachable* (docs/algorithm.md §1.8); this view shows which keys were actually *used*
by the recorded queries, and which heads never look far back.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from superlinear_lab.trace import RoutingTrace

from ._aggregate import bin_edges, snippet
from ._base import COLORS, View, ViewError, base_layout, with_model


def look_back(trace: RoutingTrace, layer, quantile: float = 0.95) -> np.ndarray:
    """float64 [H_Q]: the `quantile` of relative look-back depth (q − anchor) / (q + 1 − s) over every valid
    chosen span of the layer (0 = only the most recent keys, 1 = back to the first token); NaN if none."""
    rec = trace.layer(layer)
    q = trace.queries.numpy()[None, :, None].astype(np.float64)
    anchors = rec.qanchor.numpy().astype(np.float64)
    depth = (q - anchors) / np.maximum(q + 1 - trace.row_start, 1)
    depth = np.where(rec.qanchor.numpy() >= 0, depth, np.nan).reshape(rec.heads, -1)
    out = np.full(rec.heads, np.nan)
    for h in range(rec.heads):
        row = depth[h][np.isfinite(depth[h])]
        if row.size:
            out[h] = np.quantile(row, quantile)
    return out


class CoverageMap(View):
    """Which key positions a trace reached, per layer × head, and how far back each head looks.

    Args:
        trace: a `RoutingTrace`.
        far: a head "never looks far back" when its 95th-percentile look-back depth is below `far`
            (a fraction of the context).
        max_bins: bins of the per-position histogram.

    Actions: `select(layer, head)` (also a click on the grid), `set_include_window(bool)`, `set_bins(n)`.
    """

    title = "Coverage map"

    def __init__(self, trace: RoutingTrace, far: float = 0.25, max_bins: int = 200) -> None:
        super().__init__()
        if not isinstance(trace, RoutingTrace):
            raise TypeError(f"trace: expected a RoutingTrace, got {type(trace).__name__}")
        if not trace.layers or trace.queries.numel() == 0:
            raise ValueError("trace: no recorded layers or queries")
        if not 0 < far < 1:
            raise ValueError(f"far={far}: expected a fraction in (0, 1)")
        self.trace = trace
        self.far = far
        self.max_bins = int(max_bins)
        self.layer = trace.layers[0]
        self.head = 0
        self.include_window = True
        self._grid: dict[bool, tuple[np.ndarray, np.ndarray]] = {}
        self._counts: dict[tuple, np.ndarray] = {}
        self._hist: dict[tuple, dict] = {}

    # ------------------------------------------------------------------ derived state
    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(coverage [n_layers, H], look-back depth [n_layers, H]) over every recorded layer (cached)."""
        if self.include_window not in self._grid:
            heads = max(self.trace.layer(i).heads for i in self.trace.layers)
            cov = np.full((len(self.trace.layers), heads), np.nan)
            depth = np.full_like(cov, np.nan)
            for r, layer in enumerate(self.trace.layers):
                c = self.trace.coverage(layer, include_window=self.include_window).numpy()
                cov[r, :len(c)] = c
                d = look_back(self.trace, layer)
                depth[r, :len(d)] = d
            self._grid[self.include_window] = (cov, depth)
        return self._grid[self.include_window]

    def shallow_heads(self) -> list[tuple[int, int]]:
        """(layer, head) pairs whose 95th-percentile look-back depth stays below `far`."""
        _, depth = self.grid()
        return [(self.trace.layers[r], h) for r, h in zip(*np.nonzero(depth < self.far))]

    def histogram(self) -> dict:
        """Per key bin of the selected head: mean attend count per key and fraction of keys reached at least once
        (cached per layer, head, window setting and bins; key counts per layer for all heads at once)."""
        key = (self.layer, self.head, self.include_window, self.max_bins)
        if key not in self._hist:
            counts_key = (self.layer, self.include_window)
            if counts_key not in self._counts:
                self._counts[counts_key] = self.trace.key_counts(
                    self.layer, include_window=self.include_window).numpy()
            counts = self._counts[counts_key][self.head]
            edges = bin_edges(self.trace.length, self.max_bins)
            width = np.diff(edges)
            mean = np.add.reduceat(counts.astype(np.float64), edges[:-1]) / width
            reached = np.add.reduceat((counts > 0).astype(np.float64), edges[:-1]) / width
            self._hist[key] = dict(edges=edges, mean=mean, reached=reached,
                                   unreached_keys=int((counts[self.trace.row_start:] == 0).sum()))
        return self._hist[key]

    # ------------------------------------------------------------------ actions
    def select(self, layer, head: int) -> bool:
        """Choose the (layer, head) of the histogram."""
        def action():
            rec = self.trace.layer(layer)
            if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 0 <= head < rec.heads:
                raise ViewError(f"head={head!r}: expected an int in 0 … {rec.heads - 1}")
            self.layer, self.head = rec.index, int(head)
        return self._act(action)

    def set_include_window(self, include: bool) -> bool:
        """Count keys reached through the sliding window too (True) or through chosen spans only (False)."""
        def action():
            if not isinstance(include, bool):
                raise ViewError(f"include_window={include!r}: expected True or False")
            self.include_window = include
        return self._act(action)

    def set_bins(self, max_bins: int) -> bool:
        """Bins of the per-position histogram (8 … 2000)."""
        def action():
            if isinstance(max_bins, bool) or not isinstance(max_bins, (int, np.integer)) or not 8 <= max_bins <= 2000:
                raise ViewError(f"max_bins={max_bins!r}: expected an int in 8 … 2000")
            self.max_bins = int(max_bins)
        return self._act(action)

    # ------------------------------------------------------------------ text and figures
    def summary(self) -> str:
        cov, _ = self.grid()
        hist = self.histogram()
        shallow = self.shallow_heads()
        shallow_txt = (", ".join(f"L{l}/h{h}" for l, h in shallow[:8]) + (" …" if len(shallow) > 8 else "")
                       if shallow else "none")
        return with_model(f"layers.{self.layer}.routing head {self.head}: {hist['unreached_keys']:,} of "
                          f"{self.trace.length - self.trace.row_start:,} keys never reached"
                          f"{'' if self.include_window else ' by a chosen span'} · mean coverage over all heads "
                          f"{np.nanmean(cov):.1%} · heads that never look back past {self.far:.0%} of the context: "
                          f"{shallow_txt}", self.trace)

    def figures(self) -> list[go.Figure]:
        """The layer × head grids and the selected head's histogram, each built as one dict (validated once)."""
        cov, depth = self.grid()
        names = [f"L{i}" for i in self.trace.layers]
        heads = list(range(cov.shape[1]))
        grid_data = [
            dict(type="heatmap", z=cov, x=heads, y=names, zmin=0, zmax=1, colorscale="Viridis", xaxis="x", yaxis="y",
                 colorbar=dict(x=0.44, thickness=10, len=0.9), texttemplate="%{z:.0%}", hoverongaps=False,
                 hovertemplate="%{y} head %{x}<br>reached %{z:.1%}<extra></extra>"),
            dict(type="heatmap", z=depth, x=heads, y=names, zmin=0, zmax=1, colorscale="Cividis", xaxis="x2",
                 yaxis="y2", colorbar=dict(thickness=10, len=0.9), texttemplate="%{z:.2f}", hoverongaps=False,
                 hovertemplate="%{y} head %{x}<br>look-back %{z:.2f}<extra></extra>")]
        # The selected cell: a shape, so selecting another head only redraws shapes in the browser.
        r = self.trace.layers.index(self.layer)
        shapes = [dict(type="rect", xref=xref, yref=yref, x0=self.head - 0.5, x1=self.head + 0.5, y0=r - 0.5,
                       y1=r + 0.5, line=dict(color=COLORS["miss"], width=3)) for xref, yref in (("x", "y"), ("x2", "y2"))]
        xaxis = dict(title=dict(text="head"), dtick=1, range=[-0.5, cov.shape[1] - 0.5])
        yaxis = dict(range=[len(names) - 0.5, -0.5], type="category")  # fixed (reversed): no autorange
        grid_layout = base_layout("Per layer × head: how much of the context is used (click a cell for its "
                                  "histogram)", height=120 + 45 * len(names), showlegend=False)
        grid_layout.update(
            shapes=shapes, xaxis=dict(xaxis, domain=[0, 0.44], anchor="y"), yaxis=dict(yaxis, anchor="x"),
            xaxis2=dict(xaxis, domain=[0.56, 1.0], anchor="y2"), yaxis2=dict(yaxis, anchor="x2"),
            annotations=[dict(text=t, xref="paper", yref="paper", x=x, y=1.0, yanchor="bottom", showarrow=False,
                              font=dict(size=13))
                         for t, x in (("fraction of keys ever reached", 0.22),
                                      ("look-back depth (95th pct of (q − anchor)/q)", 0.78))])
        grid = go.Figure(dict(data=grid_data, layout=grid_layout))

        hist = self.histogram()
        edges = hist["edges"]
        centres = (edges[:-1] + edges[1:] - 1) / 2.0
        tokens = self.trace.tokens
        text = [f"keys {a:,}–{b - 1:,}" + (f": {snippet(tokens, a, b - 1, 40)}" if tokens else "")
                for a, b in zip(edges[:-1], edges[1:])]
        width = np.diff(edges)
        bars_data = [
            dict(type="bar", x=centres, y=hist["mean"], width=width, name="mean attends per key",
                 marker_color=COLORS["span"], hovertext=text, hoverinfo="text+y", xaxis="x", yaxis="y"),
            dict(type="bar", x=centres, y=1 - hist["reached"], width=width,
                 name="share of the bin's keys never reached", marker_color=COLORS["miss"], hovertext=text,
                 hoverinfo="text+y", xaxis="x2", yaxis="y2")]
        bars_layout = base_layout(f"layers.{self.layer}.routing · head {self.head}: how often each key was attended "
                                  f"({hist['unreached_keys']:,} keys never)", height=340, bargap=0)
        full = [-0.5, self.trace.length - 0.5]
        bars_layout.update(
            xaxis=dict(domain=[0, 1], anchor="y", matches="x2", showticklabels=False, range=full),
            yaxis=dict(domain=[0.3408, 1.0], anchor="x", title=dict(text="attends per key")),
            xaxis2=dict(domain=[0, 1], anchor="y2", range=full, title=dict(text="key position")),
            yaxis2=dict(domain=[0.0, 0.2808], anchor="x2", range=[0, 1], tickformat=".0%",
                        title=dict(text="never reached")))
        return [grid, go.Figure(dict(data=bars_data, layout=bars_layout))]

    def _wire_figures(self, widgets) -> None:
        def on_click(trace, points, state):
            if points.point_inds:
                layer = int(str(points.ys[0]).lstrip("L"))
                self.select(layer, int(points.xs[0]))

        for t in widgets[0].data:
            if t.type == "heatmap":
                t.on_click(on_click)

    def _build_controls(self):
        import ipywidgets as w

        layer = w.Dropdown(options=[(f"layers.{i}.routing", i) for i in self.trace.layers], value=self.layer,
                           description="layer", layout=w.Layout(width="230px"), style={"description_width": "50px"})
        head = w.Dropdown(options=list(range(self.trace.layer(self.layer).heads)), value=self.head,
                          description="head", layout=w.Layout(width="140px"), style={"description_width": "50px"})
        window = w.Checkbox(value=self.include_window, description="count the sliding window", indent=False)
        syncing = [False]

        def sync():
            syncing[0] = True
            try:
                layer.value = self.layer
                heads = list(range(self.trace.layer(self.layer).heads))
                if list(head.options) != heads:  # each assignment is a message and a re-render
                    head.options = heads
                head.value = self.head
                window.value = self.include_window
            finally:
                syncing[0] = False

        layer.observe(lambda ch: None if syncing[0] else self.select(ch["new"], min(self.head, self.trace.layer(
            ch["new"]).heads - 1)), names="value")
        head.observe(lambda ch: None if syncing[0] else self.select(self.layer, ch["new"]), names="value")
        window.observe(lambda ch: None if syncing[0] else self.set_include_window(ch["new"]), names="value")
        self.subscribe(sync)
        self._controls = dict(layer=layer, head=head, include_window=window)
        return w.HBox([layer, head, window])
