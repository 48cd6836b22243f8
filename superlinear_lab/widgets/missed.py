"""`MissedSpanDebugger`: given evidence spans in a document and the queries that needed them, show for every
layer and head whether the evidence was reached — and for a miss, why: the stripe whose span would have covered
it, that stripe's search score and rank, the margin to the K-th chosen score, and the text chosen instead.

Evidence is given in tokens or in characters (mapped to tokens through the trace's token strings). Scores and
ranks of stripes that were not chosen need the full stripe profile (`profile_queries` when the trace was
recorded); without it the view still says reached/missed and which stripe would have covered the evidence.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from superlinear_lab.trace import RoutingTrace

from ._aggregate import snippet
from ._base import COLORS, View, ViewError, base_layout
from .stripes import stripe_geometry


@dataclass(frozen=True)
class Evidence:
    """One evidence span in token positions (inclusive) and the queries that needed it."""

    start: int
    end: int
    label: str
    queries: tuple[int, ...]


def char_to_token(tokens: list[str], start: int, end: int) -> tuple[int, int]:
    """Token range [a, b] covering the inclusive character range [start, end] of "".join(tokens)."""
    if end < start or start < 0:
        raise ViewError(f"character range [{start}, {end}]: expected 0 <= start <= end")
    ends = np.cumsum([len(t) for t in tokens])  # exclusive end offset of each token
    if end >= ends[-1]:
        raise ViewError(f"character range [{start}, {end}]: the text has {int(ends[-1])} characters")
    return int(np.searchsorted(ends, start, side="right")), int(np.searchsorted(ends, end, side="right"))


def _text_pieces(trace: RoutingTrace, tokenizer) -> list[str] | None:
    """The raw text of each token (their concatenation is the document), for character evidence.

    With a tokenizer and recorded token ids, each id is decoded on its own; otherwise the trace's token
    strings are used, which is right only when they are the raw text (as in `demo_trace`) — a model's display
    strings escape newlines ("\\n"), so pass its tokenizer."""
    if tokenizer is not None:
        if trace.token_ids is None:
            raise ValueError("tokenizer given but the trace has no token_ids to decode")
        return [tokenizer.decode([i]) if i >= 0 else "" for i in trace.token_ids.tolist()]
    return trace.tokens


def _parse_evidence(trace: RoutingTrace, evidence, queries, tokenizer=None) -> list[Evidence]:
    default_q = tuple(int(q) for q in queries) if queries is not None else (int(trace.queries[-1]),)
    out = []
    for n, item in enumerate(evidence):
        if isinstance(item, Evidence):
            out.append(item)
            continue
        if isinstance(item, dict):
            start, end = item["start"], item["end"]
            unit = item.get("unit", "token")
            label = item.get("label", f"evidence {n + 1}")
            qs = tuple(int(q) for q in item.get("queries", default_q))
        else:
            start, end = item
            unit, label, qs = "token", f"evidence {n + 1}", default_q
        if unit == "char":
            pieces = _text_pieces(trace, tokenizer)
            if pieces is None:
                raise ValueError("character evidence needs the tokens' text: pass tokenizer= or record tokens")
            start, end = char_to_token(pieces, int(start), int(end))
        elif unit != "token":
            raise ValueError(f"evidence {n + 1}: unit={unit!r}, expected 'token' or 'char'")
        if not 0 <= start <= end < trace.length:
            raise ValueError(f"evidence {n + 1}: token range [{start}, {end}] outside [0, {trace.length - 1}]")
        for q in qs:
            trace.query_index(q)  # KeyError naming the query if it was not recorded
            if q < end:
                raise ValueError(f"evidence {n + 1}: query {q} comes before the evidence end {end}")
        out.append(Evidence(int(start), int(end), label, qs))
    if not out:
        raise ValueError("evidence: expected at least one span")
    return out


class MissedSpanDebugger(View):
    """Reached or missed, per evidence × query × layer × head, and the explanation of a miss.

    Args:
        trace: a `RoutingTrace` (record `profile_queries` for the needing queries to get scores and ranks).
        evidence: spans as (start, end) token pairs, dicts {start, end, unit: "token"|"char", label, queries}
            or `Evidence` objects.
        queries: the queries that needed the evidence (default: the last recorded query).
        tokenizer: maps character evidence to tokens through `tokenizer.decode` of each recorded token id
            (needed for model traces, whose token strings are display-escaped); default: `trace.tokens`.

    Actions: `select(evidence=, query=, layer=, head=)` (any subset; also a click on the grid).
    """

    title = "Missed-span debugger"

    def __init__(self, trace: RoutingTrace, evidence, queries=None, tokenizer=None) -> None:
        super().__init__()
        if not isinstance(trace, RoutingTrace):
            raise TypeError(f"trace: expected a RoutingTrace, got {type(trace).__name__}")
        self.trace = trace
        try:
            self.evidence = _parse_evidence(trace, evidence, queries, tokenizer)
        except KeyError as exc:
            raise ValueError(str(exc)) from None
        self.cases = [(e, q) for e in range(len(self.evidence)) for q in self.evidence[e].queries]
        self.case = 0
        self.layer = trace.layers[0]
        self.head = 0
        self._grid = self._reached_grid()
        self._explained: dict[tuple, dict] = {}
        missed = np.argwhere(self._grid == 0)
        if len(missed):  # start on the first miss: that is what the user came for
            c, r, h = missed[0]
            self.case, self.layer, self.head = int(c), trace.layers[r], int(h)

    # ------------------------------------------------------------------ analysis
    def _reached_grid(self) -> np.ndarray:
        """float [cases, layers, H]: fraction of evidence keys each (case, layer, head) attended (0 = missed)."""
        heads = max(self.trace.layer(i).heads for i in self.trace.layers)
        grid = np.full((len(self.cases), len(self.trace.layers), heads), np.nan)
        for c, (e, q) in enumerate(self.cases):
            ev = self.evidence[e]
            n = ev.end - ev.start + 1
            i = self.trace.query_index(q)
            for r, layer in enumerate(self.trace.layers):
                rec = self.trace.layer(layer)
                lo, hi = rec.window[i].tolist()
                win = max(0, min(hi, ev.end) - max(lo, ev.start) + 1) if lo >= 0 else 0
                for h in range(rec.heads):
                    covered = np.zeros(n, dtype=bool)
                    if win:
                        covered[max(lo, ev.start) - ev.start:min(hi, ev.end) - ev.start + 1] = True
                    for a, b in zip(rec.qstart[h, i].tolist(), rec.qend[h, i].tolist()):
                        if a >= 0 and b >= ev.start and a <= ev.end:
                            covered[max(a, ev.start) - ev.start:min(b, ev.end) - ev.start + 1] = True
                    grid[c, r, h] = covered.mean()
        return grid

    def reached(self, case: int, layer, head: int) -> float:
        """Fraction of the evidence keys attended by (case, layer, head); 0.0 is a miss."""
        return float(self._grid[case, self.trace.layers.index(self.trace.layer(layer).index), head])

    def explain(self, case: int | None = None, layer=None, head: int | None = None) -> dict:
        """Why the selected (or given) case was reached or missed, as a plain dict.

        Keys: evidence, query, layer, head, reached (fraction), covering_stripe (index, anchor, span) or None,
        score, rank (1 = best; ties → earlier anchor), kth_score, margin (K-th chosen score − this stripe's
        score, > 0 means it lost by that much), chosen (the spans attended instead, with text), profile (bool).
        """
        case = self.case if case is None else case
        layer = self.layer if layer is None else self.trace.layer(layer).index
        head = self.head if head is None else head
        key = (case, layer, head)
        if key not in self._explained:
            self._explained[key] = self._explain(case, layer, head)
        return self._explained[key]

    def _explain(self, case: int, layer: int, head: int) -> dict:
        e, q = self.cases[case]
        ev = self.evidence[e]
        rec = self.trace.layer(layer)
        i = self.trace.query_index(q)
        tokens = self.trace.tokens
        chosen = []
        for k in range(rec.num_spans):
            a = int(rec.qanchor[head, i, k])
            if a >= 0:
                s, t = int(rec.qstart[head, i, k]), int(rec.qend[head, i, k])
                chosen.append(dict(rank=k + 1, anchor=a, qstart=s, qend=t, score=float(rec.values[head, i, k]),
                                   gate=float(rec.gate[head, i, k]), text=snippet(tokens, s, t, 90)))
        g = stripe_geometry(rec.cfg, q)
        overlap = np.minimum(g.qend, ev.end) - np.maximum(g.qstart, ev.start) + 1
        covering = None
        if len(overlap) and overlap.max() > 0:
            j = int(np.argmax(overlap))  # the stripe whose span holds most of the evidence (nearest on ties)
            covering = dict(index=int(g.stripes[j]), anchor=int(g.anchors[j]), qstart=int(g.qstart[j]),
                            qend=int(g.qend[j]), keys=int(overlap[j]))
        out = dict(evidence=ev, query=q, layer=layer, head=head, reached=self.reached(case, layer, head),
                   covering_stripe=covering, score=None, rank=None, kth_score=None, margin=None, chosen=chosen,
                   profile=False, in_window=bool(g.window and g.window[0] <= ev.end))
        if chosen:
            out["kth_score"] = min(c["score"] for c in chosen)
        pq = rec.profile_queries.numpy()
        p = int(np.searchsorted(pq, q)) if len(pq) else 0
        if covering is not None and p < len(pq) and pq[p] == q:
            anchors = rec.stripe_anchors[p].numpy()
            values = rec.stripe_values[head, p].numpy()
            cand = (anchors >= 0) & np.isfinite(values)
            col = int(np.nonzero(anchors == covering["anchor"])[0][0])
            score = float(values[col])
            # Rank under the SPEC §2.3 tie rule: higher score first, then the earlier anchor.
            better = cand & ((values > score) | ((values == score) & (anchors < covering["anchor"])))
            out.update(profile=True, score=score, rank=int(better.sum()) + 1)
            if out["kth_score"] is not None:
                out["margin"] = out["kth_score"] - score
        return out

    # ------------------------------------------------------------------ actions
    def select(self, evidence: int | None = None, query: int | None = None, layer=None, head: int | None = None
               ) -> bool:
        """Choose what the detail shows: evidence index, query position, layer, head (any subset)."""
        def action():
            e = self.cases[self.case][0] if evidence is None else evidence
            if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= e < len(self.evidence):
                raise ViewError(f"evidence={e!r}: expected an index in 0 … {len(self.evidence) - 1}")
            q = query if query is not None else (self.cases[self.case][1] if self.cases[self.case][0] == e
                                                 else self.evidence[e].queries[0])
            if (e, q) not in self.cases:
                raise ViewError(f"query {q} did not need evidence {e} (its queries: {list(self.evidence[e].queries)})")
            new_layer = self.layer if layer is None else self.trace.layer(layer).index
            h = self.head if head is None else head
            heads = self.trace.layer(new_layer).heads
            if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 0 <= h < heads:
                raise ViewError(f"head={h!r}: expected an int in 0 … {heads - 1}")
            self.case, self.layer, self.head = self.cases.index((e, q)), new_layer, int(h)
        return self._act(action)

    # ------------------------------------------------------------------ text and figures
    def summary(self) -> str:
        total = np.isfinite(self._grid).sum()
        missed = int((self._grid == 0).sum())
        return (f"{len(self.evidence)} evidence span(s) × {len(self.cases)} (evidence, query) case(s) × "
                f"{len(self.trace.layers)} layer(s) × heads: {missed} of {int(total)} missed")

    def _case_label(self, c: int) -> str:
        e, q = self.cases[c]
        return f"{self.evidence[e].label} · q {q:,}"

    def panels_html(self) -> list[str]:
        x = self.explain()
        ev = x["evidence"]
        tokens = self.trace.tokens
        lines = [f"<b>{html.escape(ev.label)}</b> — tokens [{ev.start:,}, {ev.end:,}]"
                 + (f": <code>{html.escape(snippet(tokens, ev.start, ev.end, 90))}</code>" if tokens else ""),
                 f"query {x['query']:,} · layers.{x['layer']}.routing · head {x['head']}: "]
        if x["reached"] > 0:
            lines[-1] += (f"<span style='color:{COLORS['anchor']};font-weight:600'>REACHED</span> "
                          f"({x['reached']:.0%} of the evidence keys attended)")
        else:
            lines[-1] += f"<span style='color:{COLORS['miss']};font-weight:600'>MISSED</span>"
            cs = x["covering_stripe"]
            if cs is None:
                lines.append("no candidate span of this query contains the evidence (a geometry gap: see lesson 01)")
            else:
                line = (f"stripe i={cs['index']} (anchor {cs['anchor']:,}, span [{cs['qstart']:,}, {cs['qend']:,}]) "
                        f"would have covered {cs['keys']:,} evidence keys")
                if x["profile"]:
                    line += (f"; its score {x['score']:.3f} ranked <b>#{x['rank']}</b>, "
                             f"{x['margin']:.3f} below the K-th chosen score {x['kth_score']:.3f}"
                             if x["margin"] is not None else f"; score {x['score']:.3f}, rank #{x['rank']}")
                else:
                    line += " (no stripe profile recorded for this query: score and rank unknown)"
                lines.append(line)
        rows = "".join(f"<tr><td>#{c['rank']}</td><td>{c['anchor']:,}</td><td>[{c['qstart']:,}, {c['qend']:,}]</td>"
                       f"<td>{c['score']:.3f}</td><td>{c['gate']:.2f}</td><td><code>{html.escape(c['text'])}</code>"
                       f"</td></tr>" for c in x["chosen"])
        table = ("<table style='border-collapse:collapse;font-size:12px'><tr><th>chosen</th><th>anchor</th>"
                 f"<th>span</th><th>score</th><th>gate</th><th>text chosen instead</th></tr>{rows}</table>"
                 if rows else "<i>no span chosen (window only)</i>")
        table = table.replace("<td", "<td style='padding:2px 10px 2px 0;vertical-align:top;white-space:nowrap'").replace(
            "<th>", "<th style='padding:2px 10px 2px 0;text-align:left'>")
        return ["<div class='sl-explain'>" + "<br>".join(lines) + table + "</div>"]

    def figures(self) -> list[go.Figure]:
        n_cases, n_layers, heads = self._grid.shape
        z = self._grid.reshape(n_cases * n_layers, heads)
        ylabels = [f"{self._case_label(c)} · L{layer}" for c in range(n_cases) for layer in self.trace.layers]
        grid = go.Figure()
        grid.add_trace(go.Heatmap(z=z, x=list(range(heads)), y=ylabels, zmin=0, zmax=1,
                                  colorscale=[[0, COLORS["miss"]], [1e-9, "#c7e9c0"], [1, COLORS["anchor"]]],
                                  xgap=2, ygap=2, texttemplate="%{z:.0%}", showscale=False,
                                  hovertemplate="%{y} · head %{x}<br>evidence attended: %{z:.0%}<extra></extra>"))
        row = self.case * n_layers + self.trace.layers.index(self.layer)
        grid.add_trace(go.Scatter(x=[self.head], y=[ylabels[row]], mode="markers", hoverinfo="skip",
                                  marker=dict(symbol="square-open", size=28, color="black", line=dict(width=3))))
        grid.update_layout(**base_layout("Was the evidence attended? (red = missed; click a cell to explain it)",
                                         height=110 + 32 * len(ylabels), showlegend=False))
        grid.update_layout(margin=dict(l=230, r=20, t=50, b=40))
        grid.update_xaxes(title_text="head", dtick=1)
        grid.update_yaxes(autorange="reversed")

        x = self.explain()
        rec = self.trace.layer(self.layer)
        q = x["query"]
        ev = x["evidence"]
        detail = go.Figure()
        pq = rec.profile_queries.numpy()
        p = int(np.searchsorted(pq, q)) if len(pq) else 0
        if p < len(pq) and pq[p] == q:
            anchors = rec.stripe_anchors[p].numpy()
            values = rec.stripe_values[self.head, p].numpy()
            ok = (anchors >= 0) & np.isfinite(values)
            order = np.argsort(anchors[ok])
            detail.add_trace(go.Scatter(x=anchors[ok][order], y=values[ok][order], mode="lines+markers",
                                        name="score of every stripe", line=dict(color=COLORS["muted"], width=1),
                                        marker=dict(size=4, color="#888")))
        else:
            detail.add_trace(go.Scatter(x=[], y=[], name="score of every stripe (not recorded)"))
        detail.add_trace(go.Scatter(x=[c["anchor"] for c in x["chosen"]], y=[c["score"] for c in x["chosen"]],
                                    mode="markers+text", text=[f"#{c['rank']}" for c in x["chosen"]],
                                    textposition="top center", name="chosen top-K",
                                    marker=dict(size=12, color=COLORS["span"], line=dict(color="black", width=1))))
        cs = x["covering_stripe"]
        detail.add_trace(go.Scatter(x=[cs["anchor"]] if cs and x["score"] is not None else [],
                                    y=[x["score"]] if cs and x["score"] is not None else [], mode="markers",
                                    name="stripe covering the evidence",
                                    marker=dict(size=14, color=COLORS["miss"], symbol="x")))
        detail.add_vrect(x0=ev.start - 0.5, x1=ev.end + 0.5, fillcolor=COLORS["miss"], opacity=0.18, line_width=0)
        if x["kth_score"] is not None:
            detail.add_hline(y=x["kth_score"], line=dict(color=COLORS["span"], dash="dot", width=1))
        detail.update_layout(**base_layout(f"Query {q:,} · layers.{self.layer}.routing · head {self.head}: "
                                           "search scores (evidence shaded red)", height=300))
        detail.update_xaxes(title_text="anchor position", range=[-0.03 * q - 1, 1.03 * q + 1])
        ys = [float(v) for t in detail.data if t.y is not None for v in t.y if v is not None]
        if ys:  # room above the top marker for its "#1" label
            lo, hi = min(ys), max(ys)
            pad = 0.15 * max(hi - lo, 1e-6)
            detail.update_yaxes(range=[lo - pad, hi + 2 * pad])
        detail.update_yaxes(title_text="score")
        return [grid, detail]

    def _wire_figures(self, widgets) -> None:
        n_layers = len(self.trace.layers)

        def on_click(trace, points, state):
            if points.point_inds:
                row = points.point_inds[0][0] if isinstance(points.point_inds[0], (list, tuple)) else None
                label = points.ys[0]
                labels = [f"{self._case_label(c)} · L{layer}" for c in range(len(self.cases))
                          for layer in self.trace.layers]
                row = labels.index(label) if row is None else row
                c, r = divmod(row, n_layers)
                e, q = self.cases[c]
                self.select(evidence=e, query=q, layer=self.trace.layers[r], head=int(points.xs[0]))

        widgets[0].data[0].on_click(on_click)

    def _build_controls(self):
        import ipywidgets as w

        case = w.Dropdown(options=[(self._case_label(c), c) for c in range(len(self.cases))], value=self.case,
                          description="case", layout=w.Layout(width="320px"), style={"description_width": "40px"})
        layer = w.Dropdown(options=[(f"layers.{i}.routing", i) for i in self.trace.layers], value=self.layer,
                           description="layer", layout=w.Layout(width="220px"), style={"description_width": "40px"})
        heads = self.trace.layer(self.layer).heads
        head = w.IntSlider(value=self.head, min=0, max=heads - 1, description="head", continuous_update=False,
                           layout=w.Layout(width="260px"), style={"description_width": "40px"})
        syncing = [False]

        def sync():
            syncing[0] = True
            try:
                case.value, layer.value, head.value = self.case, self.layer, self.head
            finally:
                syncing[0] = False

        def on_case(ch):
            if not syncing[0]:
                e, q = self.cases[ch["new"]]
                self.select(evidence=e, query=q)

        case.observe(on_case, names="value")
        layer.observe(lambda ch: None if syncing[0] else self.select(layer=ch["new"]), names="value")
        head.observe(lambda ch: None if syncing[0] else self.select(head=ch["new"]), names="value")
        self.subscribe(sync)
        self._controls = dict(case=case, layer=layer, head=head)
        return w.HBox([case, layer, head])
