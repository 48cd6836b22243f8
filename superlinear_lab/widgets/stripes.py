"""`StripeExplorer`: the teaching view of docs/algorithm.md §1 — one query's window, stripe anchors and candidate spans, and
whether their union covers every earlier key (structural non-exclusion, §1.8).

It needs no model and no trace, only a `SpanConfig`. Offsets and span lengths come from the kernels' exact
tables (`stripe_table`, `span_bounds`, Decision D1 in docs/design.md), evaluated for all stripes of the query at once so a query
at position 10^6 with thousands of stripes still redraws quickly. Coverage over all queries up to
`max_query` is re-proved with `superlinear_kernels.coverage` whenever a parameter changes.
"""
from __future__ import annotations

import html as _html
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import plotly.graph_objects as go

from superlinear_kernels import CoverageReport, SpanConfig, coverage, query_geometry
from superlinear_kernels.geometry import first_uncovered_key

from ._base import COLORS, View, ViewError, base_layout

# Search powers offered by the p slider: the integer modes 1/N plus the released model's 0.55 and a few
# fractions between. Exact fractions, so 1/3 is integer mode N = 3 and not 0.33.
SEARCH_POWERS: tuple[tuple[str, float], ...] = (
    ("1/6 (N=6)", 1 / 6), ("1/5 (N=5)", 1 / 5), ("1/4 (N=4)", 1 / 4), ("1/3 (N=3)", 1 / 3),
    ("0.4", 0.4), ("0.45", 0.45), ("1/2 (N=2)", 1 / 2), ("0.55", 0.55), ("0.6", 0.6), ("2/3", 2 / 3),
)
PARAMS = ("search_power", "span_power", "backward_factor", "forward_factor", "sw_index", "num_spans")
X_AXES = ("position", "distance")


@dataclass(frozen=True)
class StripeGeometry:
    """All stripes of one query as arrays (nearest anchor first), plus window, union and first gap."""

    query: int
    t: int  # q + 1 (row start 0)
    window: tuple[int, int] | None  # [sw_start, q] or None (σ = 0)
    backward_len: int  # B(t)
    forward_len: int  # Fw(t)
    stripes: np.ndarray  # int64 [S] stripe index i = σ+1 .. M(q+1)
    offsets: np.ndarray  # int64 [S] F(i)
    anchors: np.ndarray  # int64 [S] q + 1 - F(i) (all >= 0: only candidates are listed)
    qstart: np.ndarray  # int64 [S] span start
    qend: np.ndarray  # int64 [S] span end
    union: tuple[tuple[int, int], ...]  # window ∪ spans as sorted disjoint inclusive intervals
    first_uncovered: int | None  # smallest key in [0, q] no span or window reaches


def stripe_geometry(cfg: SpanConfig, q: int) -> StripeGeometry:
    """Window, candidate stripes and spans of query `q` (row start 0), as numpy arrays for the figures:
    `superlinear_kernels.query_geometry` (the one geometry of a query) restricted to its candidates."""
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 0:
        raise ViewError(f"query position q={q!r}: expected an int >= 0")
    g = query_geometry(cfg, int(q))
    keep = g.candidate
    union = tuple(g.covered())
    return StripeGeometry(
        query=g.query, t=g.t, window=g.window, backward_len=g.backward_len, forward_len=g.forward_len,
        stripes=g.stripe_index[keep].numpy(), offsets=g.offsets[keep].numpy(), anchors=g.anchors[keep].numpy(),
        qstart=g.qstart[keep].numpy(), qend=g.qend[keep].numpy(), union=union,
        first_uncovered=first_uncovered_key(union, 0, g.query),
    )


def _segments(starts: np.ndarray, ends: np.ndarray, rows: np.ndarray):
    """x/y arrays drawing one horizontal segment per row, separated by None (one trace for thousands)."""
    n = len(starts)
    x = np.empty(3 * n, dtype=object)
    y = np.empty(3 * n, dtype=object)
    x[0::3], x[1::3], x[2::3] = starts, ends, None
    y[0::3], y[1::3], y[2::3] = rows, rows, None
    return x, y


class StripeExplorer(View):
    """Pick a query position and see its window, every stripe anchor, each candidate span and their union.

    Args:
        cfg: the `SpanConfig` to start from (default `SpanConfig.default()`).
        query: the query position q shown first.
        max_query: largest position the q slider reaches; coverage is proved for every q < max_query.

    Actions (each returns True on success; on failure `error` holds the message and nothing changes):
    `set_query(q)`, `set_params(**fields)` (any `SpanConfig` field), `use_preset("default" | "release")`,
    `set_x_axis("position" | "distance")`, `go_to_gap()`.

    Example::

        ex = StripeExplorer(SpanConfig.default(), query=1000)
        ex.set_params(backward_factor=1.9)   # N = 2 with b_f < 2: coverage breaks
        ex.coverage_report.first_gap         # (898, 0)
        ex                                   # the live widget in a notebook
    """

    title = "Stripe explorer"

    def __init__(self, cfg: SpanConfig | None = None, query: int = 1000, max_query: int = 1 << 20) -> None:
        super().__init__()
        cfg = SpanConfig.default() if cfg is None else cfg
        if not isinstance(cfg, SpanConfig):
            raise TypeError(f"cfg: expected a SpanConfig, got {type(cfg).__name__}")
        if isinstance(max_query, bool) or not isinstance(max_query, int) or max_query < 2:
            raise ValueError(f"max_query={max_query!r}: expected an int >= 2")
        self.max_query = max_query
        self.cfg = cfg
        self.query = 0
        self.x_axis = "position"
        self._coverage: dict[SpanConfig, CoverageReport] = {}
        self._geometry_key: tuple | None = None
        self._geometry: StripeGeometry | None = None
        self.set_query(query)
        if self.error:
            raise ValueError(self.error)

    # ------------------------------------------------------------------ derived state
    @property
    def geometry(self) -> StripeGeometry:
        """Geometry of the current query under the current config (memoised on (cfg, q))."""
        key = (self.cfg, self.query)
        if self._geometry_key != key:
            self._geometry = stripe_geometry(self.cfg, self.query)
            self._geometry_key = key
        return self._geometry

    @property
    def coverage_report(self) -> CoverageReport:
        """Coverage proof (or first gap) for every query 0 .. max_query - 1 under the current config."""
        report = self._coverage.get(self.cfg)
        if report is None:
            report = coverage(self.cfg, self.max_query)
            self._coverage[self.cfg] = report
        return report

    def keys_per_query(self) -> int:
        """At most K·(B + Fw + 1) + W keys attended by the current query (docs/algorithm.md §1.9)."""
        g = self.geometry
        return self.cfg.num_spans * (g.backward_len + g.forward_len + 1) + self.cfg.window_len

    # ------------------------------------------------------------------ actions
    def set_query(self, q: int) -> bool:
        """Show query position `q` (0 <= q < max_query)."""
        def action():
            if isinstance(q, bool) or not isinstance(q, (int, np.integer)):
                raise ViewError(f"query position q={q!r}: expected an int")
            if not 0 <= q < self.max_query:
                raise ViewError(f"query position q={q}: expected 0 <= q < max_query = {self.max_query}")
            self.query = int(q)
        return self._act(action)

    def set_params(self, **changes) -> bool:
        """Change `SpanConfig` fields (validated by `SpanConfig`); coverage is re-proved for the new config."""
        def action():
            unknown = set(changes) - set(PARAMS)
            if unknown:
                raise ViewError(f"unknown parameter(s) {sorted(unknown)}: expected some of {list(PARAMS)}")
            new = self.cfg.replace(**changes)
            coverage_of_new = self._coverage.get(new) or coverage(new, self.max_query)
            self._coverage[new] = coverage_of_new
            self.cfg = new
        return self._act(action)

    def use_preset(self, name: str) -> bool:
        """Switch to `SpanConfig.default()` or `SpanConfig.release()`."""
        def action():
            presets = {"default": SpanConfig.default, "release": SpanConfig.release}
            if name not in presets:
                raise ViewError(f"preset={name!r}: expected one of {sorted(presets)}")
            self.cfg = presets[name]()
            self.coverage_report  # noqa: B018 - prove it now, inside the action
        return self._act(action)

    def set_x_axis(self, mode: str) -> bool:
        """'position' (key index, linear) or 'distance' (keys back from q, log scale)."""
        def action():
            if mode not in X_AXES:
                raise ViewError(f"x axis={mode!r}: expected one of {X_AXES}")
            self.x_axis = mode
        return self._act(action)

    def go_to_gap(self) -> bool:
        """Jump to the first query whose keys are not all covered (an error if coverage holds)."""
        def action():
            report = self.coverage_report
            if report.ok:
                raise ViewError(f"coverage holds for every q < {self.max_query}: there is no gap to go to")
            self.query = report.first_gap[0]
        return self._act(action)

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        g, cfg, report = self.geometry, self.cfg, self.coverage_report
        parts = [f"q = {g.query:,}", f"W = {cfg.window_len:,}", f"{len(g.stripes):,} candidate stripes",
                 f"B(t) = {g.backward_len:,}, Fw(t) = {g.forward_len:,}",
                 f"≤ {self.keys_per_query():,} keys read (K = {cfg.num_spans})"]
        if g.first_uncovered is not None:
            parts.append(f"key {g.first_uncovered:,} is NOT reachable from this query")
        if report.ok:
            parts.append(f"coverage proved for every q < {self.max_query:,}")
        else:
            parts.append(f"coverage BROKEN: first gap at query {report.first_gap[0]:,}, key {report.first_gap[1]:,}")
        return " · ".join(parts)

    # ------------------------------------------------------------------ figure
    def _x(self, keys):
        """Map key positions to the x axis (distance back from q is q - key + 1, so the query itself is 1)."""
        keys = np.asarray(keys, dtype=np.int64)
        return keys if self.x_axis == "position" else self.query - keys + 1

    def figures(self) -> list[go.Figure]:
        """One figure: union / window / query on top, one row per candidate stripe below. Built as one dict
        (validated once): plotly's incremental API cost ~10x more per slider step."""
        g, cfg = self.geometry, self.cfg
        rows = g.stripes
        n_rows = len(rows)
        dense = n_rows > 60  # thinner marks when hundreds of stripes share the plot
        hover = [f"stripe i={i}<br>F(i)={f:,}<br>anchor {a:,}<br>span [{s:,}, {e:,}] ({e - s + 1:,} keys)"
                 for i, f, a, s, e in zip(rows.tolist(), g.offsets.tolist(), g.anchors.tolist(),
                                          g.qstart.tolist(), g.qend.tolist())]
        top, bottom = dict(xaxis="x", yaxis="y"), dict(xaxis="x2", yaxis="y2")
        data = []
        # Top panel: what the query can reach (union), the window, the unreachable keys in red.
        u_start = np.array([a for a, _ in g.union], dtype=np.int64)
        u_end = np.array([b for _, b in g.union], dtype=np.int64)
        ux, uy = _segments(self._x(u_start), self._x(u_end), np.zeros(len(u_start)))
        data.append(dict(type="scatter", x=ux, y=uy, mode="lines", name="union = reachable keys",
                         line=dict(color=COLORS["union"], width=10), hoverinfo="text",
                         hovertext=[f"reachable [{a:,}, {b:,}]" for a, b in g.union for _ in range(3)], **top))
        gaps = _complement(g.union, g.query)
        gx, gy = _segments(self._x([a for a, _ in gaps]), self._x([b for _, b in gaps]), np.zeros(len(gaps)))
        data.append(dict(type="scatter", x=gx, y=gy, mode="lines+markers", name="unreachable keys",
                         line=dict(color=COLORS["miss"], width=10), marker=dict(color=COLORS["miss"], size=10),
                         hoverinfo="text", hovertext=[f"NOT reachable [{a:,}, {b:,}]" for a, b in gaps for _ in range(3)],
                         **top))
        wx, wy = [], []
        if g.window is not None:
            wx, wy = _segments(self._x([g.window[0]]), self._x([g.window[1]]), np.array([1]))
        data.append(dict(type="scatter", x=wx, y=wy, mode="lines", name=f"window (W={cfg.window_len:,})",
                         line=dict(color=COLORS["window"], width=10), hoverinfo="text",
                         hovertext=(f"window [{g.window[0]:,}, {g.window[1]:,}]" if g.window else ""), **top))
        data.append(dict(type="scatter", x=self._x([g.query]), y=[0], mode="markers", name=f"query q={g.query:,}",
                         marker=dict(color=COLORS["query"], size=11, symbol="triangle-left"),
                         hoverinfo="text", hovertext=[f"query q = {g.query:,}"], **top))
        # Bottom panel: one row per candidate stripe — its span (a segment) and its anchor (a diamond).
        sx, sy = _segments(self._x(g.qstart), self._x(g.qend), rows)
        data.append(dict(type="scatter", x=sx, y=sy, mode="lines", name="candidate span",
                         line=dict(color=COLORS["span"], width=2 if dense else 5),
                         hovertext=np.repeat(np.array(hover, dtype=object), 3), hoverinfo="text", **bottom))
        data.append(dict(type="scatter", x=self._x(g.anchors), y=rows, mode="markers", name="anchor a_i = q+1−F(i)",
                         marker=dict(color=COLORS["anchor"], size=3 if dense else 7, symbol="diamond"),
                         hovertext=hover, hoverinfo="text", **bottom))
        shapes = []
        if g.first_uncovered is not None:  # the gap line exists only while this query has a gap
            xk = float(self._x([g.first_uncovered])[0])
            shapes.append(dict(type="line", xref="x2", yref="paper", x0=xk, x1=xk, y0=0, y1=1, name="first-gap",
                               line=dict(color=COLORS["miss"], width=2, dash="dash")))
            status = f"key {g.first_uncovered:,} is NOT reachable from it"
        else:
            status = "it reaches every earlier key"
        title = f"Query q = {g.query:,}: window + {n_rows:,} candidate spans — {status}"
        height = int(min(640, max(360, 160 + 10 * n_rows)))
        layout = base_layout(title, height=height, hovermode="closest")
        layout.update(margin=dict(l=80, r=20, t=90, b=50), shapes=shapes,
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, xanchor="left"))
        layout["title"].update(y=0.98, yanchor="top", yref="container")
        if g.first_uncovered is not None:
            layout["title"]["font"] = dict(size=14, color=COLORS["miss"])
        if self.x_axis == "position":
            xrange, xtype, xtitle = [-0.02 * (g.query + 1), 1.02 * (g.query + 1)], "linear", "key position"
        else:
            xrange, xtype = [-0.05, math.log10(g.query + 1) + 0.05], "log"
            xtitle = "keys back from q (q − key + 1, log scale)"
        layout.update(
            xaxis=dict(domain=[0, 1], anchor="y", matches="x2", showticklabels=False, range=xrange, type=xtype,
                       zeroline=False),
            yaxis=dict(domain=[0.8432, 1.0], anchor="x", tickvals=[0, 1], ticktext=["union", "window"],
                       range=[1.7, -0.7], showgrid=False, zeroline=False),
            xaxis2=dict(domain=[0, 1], anchor="y2", range=xrange, type=xtype, zeroline=False,
                        title=dict(text=xtitle)),
            yaxis2=dict(domain=[0, 0.8132], anchor="x2", title=dict(text="stripe i"), autorange="reversed",
                        zeroline=False, showgrid=False, tickprefix="i="))
        return [go.Figure(dict(data=data, layout=layout))]

    # ------------------------------------------------------------------ export
    def to_html(self, path, queries=None):
        """Self-contained HTML (plotly.js inlined) with a slider over query positions that works offline,
        without a kernel: one precomputed frame per position (default: 16 log-spaced positions up to the
        current query's slider range, plus the current query)."""
        from pathlib import Path

        import plotly.io as pio

        if queries is None:
            top = self.max_query - 1
            queries = sorted({int(round(x)) for x in np.geomspace(1, top, 16)} | {self.query})
        queries = [int(q) for q in queries]
        bad = [q for q in queries if not 0 <= q < self.max_query]
        if bad or not queries:
            raise ValueError(f"queries={bad or queries}: expected positions in [0, {self.max_query})")
        current = self.query
        frames, steps = [], []
        try:
            for q in queries:
                self.query = q
                fig = self.figures()[0]
                name = str(q)
                frames.append(go.Frame(data=fig.data, name=name, layout=dict(
                    title=fig.layout.title, xaxis=dict(range=fig.layout.xaxis.range),
                    xaxis2=dict(range=fig.layout.xaxis2.range), shapes=fig.layout.shapes,
                    height=fig.layout.height)))
                steps.append(dict(method="animate", label=f"{q:,}",
                                  args=[[name], dict(mode="immediate", frame=dict(duration=0, redraw=True),
                                                     transition=dict(duration=0))]))
        finally:
            self.query = current
        first = queries.index(current) if current in queries else 0
        fig = go.Figure(data=frames[first].data, frames=frames, layout=self._figure_for(queries[first]).layout)
        fig.update_layout(sliders=[dict(active=first, steps=steps, currentvalue=dict(prefix="query q = "),
                                        pad=dict(t=60), len=1.0, x=0)], margin=dict(b=140))
        # auto_play=False: the page opens on the current query (plotly's default plays every frame on load)
        body = pio.to_html(fig, include_plotlyjs=True, full_html=False, auto_play=False,
                           config={"displaylogo": False})
        html_text = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
                     f"<title>{_html.escape(self.title)}: {_html.escape(self.summary())}</title></head>"
                     "<body style='font-family:system-ui,sans-serif;margin:24px'>"
                     f"<h2>{_html.escape(self.title)}</h2><div class='sl-summary'>{_html.escape(self.summary())}"
                     f"</div>{body}</body></html>")
        path = Path(path)
        path.write_text(html_text, encoding="utf-8")
        return path

    def _figure_for(self, q: int) -> go.Figure:
        current = self.query
        try:
            self.query = q
            return self.figures()[0]
        finally:
            self.query = current

    # ------------------------------------------------------------------ widget controls
    def _build_controls(self):
        import ipywidgets as w

        cfg = self.cfg
        style = {"description_width": "100px"}
        lay = w.Layout(width="315px")
        exp_max = math.log2(self.max_query - 1)
        q_slider = w.FloatLogSlider(value=max(self.query, 1), base=2, min=0, max=exp_max, step=0.01,
                                    description="query q (log)", readout=False, style=style,
                                    layout=w.Layout(width="420px"), continuous_update=False)
        q_text = w.BoundedIntText(value=self.query, min=0, max=self.max_query - 1, description="q =",
                                  style={"description_width": "30px"}, layout=w.Layout(width="150px"))
        p_slider = w.SelectionSlider(options=SEARCH_POWERS, value=_nearest_power(cfg.search_power),
                                     description="p (stripes)", style=style, layout=lay, continuous_update=False)
        sliders = {
            "search_power": p_slider,
            "span_power": w.FloatSlider(value=cfg.span_power, min=0.3, max=0.9, step=0.01, description="ρ (spans)",
                                        style=style, layout=lay, continuous_update=False),
            "backward_factor": w.FloatSlider(value=cfg.backward_factor, min=0.5, max=4.0, step=0.1,
                                             description="b_f (backward)", style=style, layout=lay,
                                             continuous_update=False),
            "forward_factor": w.FloatSlider(value=cfg.forward_factor, min=0.0, max=3.0, step=0.1,
                                            description="f_f (forward)", style=style, layout=lay,
                                            continuous_update=False),
            "sw_index": w.IntSlider(value=cfg.sw_index, min=0, max=80, description="σ (window)", style=style,
                                    layout=lay, continuous_update=False),
            "num_spans": w.IntSlider(value=cfg.num_spans, min=1, max=8, description="K (spans)", style=style,
                                     layout=lay, continuous_update=False),
        }
        x_toggle = w.ToggleButtons(options=[("key position", "position"), ("log distance", "distance")],
                                   value=self.x_axis, style={"button_width": "110px"})
        presets = [w.Button(description=f"{name} preset", layout=w.Layout(width="130px")) for name in
                   ("default", "release")]
        gap_button = w.Button(description="go to first gap", layout=w.Layout(width="264px"))
        syncing = [False]

        def sync_from_state():
            syncing[0] = True
            try:
                c = self.cfg
                q_slider.value = max(self.query, 1)
                q_text.value = self.query
                p_slider.value = _nearest_power(c.search_power)
                for name, slider in sliders.items():
                    if name != "search_power":
                        slider.value = getattr(c, name)
                x_toggle.value = self.x_axis
                report = self.coverage_report
                gap_button.disabled = report.ok
                gap_button.button_style = "success" if report.ok else "danger"
                gap_button.description = ("coverage holds ✓" if report.ok else
                                          f"go to first gap (q={report.first_gap[0]:,})")
            finally:
                syncing[0] = False

        def guarded(fn):
            def handler(change):
                if not syncing[0]:
                    fn(change)
            return handler

        q_slider.observe(guarded(lambda ch: self.set_query(int(round(ch["new"])) if ch["new"] >= 1.5 else 0)
                                 ), names="value")
        q_text.observe(guarded(lambda ch: self.set_query(int(ch["new"]))), names="value")
        for name, slider in sliders.items():
            slider.observe(guarded(lambda ch, name=name: self.set_params(**{name: ch["new"]})), names="value")
        x_toggle.observe(guarded(lambda ch: self.set_x_axis(ch["new"])), names="value")
        presets[0].on_click(lambda _: self.use_preset("default"))
        presets[1].on_click(lambda _: self.use_preset("release"))
        gap_button.on_click(lambda _: self.go_to_gap())
        self.subscribe(sync_from_state)
        sync_from_state()
        self._controls = dict(query=q_slider, query_text=q_text, x_axis=x_toggle, gap=gap_button,
                              presets=presets, **sliders)
        grid = [[sliders[n] for n in ("search_power", "span_power", "num_spans")],
                [sliders[n] for n in ("backward_factor", "forward_factor", "sw_index")]]
        return w.VBox([w.HBox([q_slider, q_text, w.Label("x axis:"), x_toggle]),
                       *(w.HBox(row) for row in grid), w.HBox(presets + [gap_button])])


def _complement(union: tuple[tuple[int, int], ...], q: int) -> list[tuple[int, int]]:
    """Keys of [0, q] outside `union`, as inclusive intervals."""
    gaps, expected = [], 0
    for a, b in union:
        if a > expected:
            gaps.append((expected, a - 1))
        expected = max(expected, b + 1)
    if expected <= q:
        gaps.append((expected, q))
    return gaps


def _nearest_power(p: float) -> float:
    """The slider option closest to search power `p` (the slider only offers `SEARCH_POWERS`)."""
    return min((value for _, value in SEARCH_POWERS), key=lambda v: abs(Fraction(v) - Fraction(p)))
