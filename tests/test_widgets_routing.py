"""Controller tests for the trace views — `RoutingExplorer` (incl. compare mode), `CoverageMap`,
`MissedSpanDebugger` — and for the exact aggregation under them. No browser: actions are called directly, and
the thin widgets are driven through their controls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from superlinear_kernels import SearchResult, SpanConfig, span_search, stripe_scores
from superlinear_lab.trace import RoutingTrace
from superlinear_lab.widgets import (CoverageMap, MissedSpanDebugger, RoutingExplorer, char_to_token, look_back,
                                     routing_map)
from superlinear_lab.widgets._aggregate import bin_edges, interval_mass, snippet
from superlinear_lab.widgets.demo import demo_trace, plant, reference_text


def _trace(length=96, heads=3, cfg=None, seed=0, queries=None, profile=None, tokens=True):
    cfg = SpanConfig.default() if cfg is None else cfg
    gen = torch.Generator().manual_seed(seed)
    q1 = torch.randn(1, heads, length, 8, generator=gen)
    k = torch.randn(1, 1, length, 8, generator=gen)
    pos = torch.arange(length) if queries is None else torch.as_tensor(queries)
    r = span_search(q1[:, :, pos].contiguous(), k, pos, cfg, backend="torch")
    prof = torch.tensor([length - 1] if profile is None else profile)
    ss = stripe_scores(q1[:, :, prof].contiguous(), k, prof, cfg)
    toks = [chr(97 + i % 26) for i in range(length)] if tokens else None
    return RoutingTrace.from_search(r, pos, cfg, stripe_scores=ss, profile_queries=prof, length=length, tokens=toks)


# --------------------------------------------------------------------------- aggregation
def test_interval_mass_equals_dense_reference():
    rng = np.random.default_rng(1)
    length, n, rows = 257, 400, 9
    r = rng.integers(-1, rows + 1, n)  # includes rows outside [0, rows): ignored
    s = rng.integers(0, length, n)
    e = np.minimum(s + rng.integers(-5, 60, n), length - 1)  # includes empty intervals
    w = rng.random(n)
    for bins in (1, 7, 64, 257, 1000):
        edges = bin_edges(length, bins)
        got = interval_mass(r, s, e, w, rows, edges)
        dense = np.zeros((rows, length))
        for ri, a, b, wi in zip(r, s, e, w):
            if 0 <= ri < rows and b >= a:
                dense[ri, a:b + 1] += wi
        ref = np.add.reduceat(dense, edges[:-1], axis=1)
        np.testing.assert_allclose(got, ref, atol=1e-9)


def test_bin_edges_exact_for_short_inputs():
    assert bin_edges(5, 240).tolist() == [0, 1, 2, 3, 4, 5]
    edges = bin_edges(65_536, 240)
    assert edges[0] == 0 and edges[-1] == 65_536 and len(edges) == 241
    with pytest.raises(ValueError):
        bin_edges(0, 10)


def test_routing_map_exact_matches_trace_reached():
    """For a short trace the map is exact: cell (q, key) > 0 iff some chosen span of q contains key."""
    tr = _trace(length=80)
    m = routing_map(tr, 0, head=1, max_bins=240)
    assert m.exact and m.spans.shape == (80, 80)
    for q in (10, 40, 79):
        for key in range(q + 1):
            in_span = bool(tr.reaching_spans(0, 1, q, key))
            assert (m.spans[q, key] > 0) == in_span
            assert (m.window[q, key] > 0) == tr.in_window(0, q, key)


def test_routing_map_aggregated_conserves_mass():
    tr = _trace(length=600, queries=list(range(0, 600, 3)))
    m = routing_map(tr, 0, head=0, max_bins=50)
    assert not m.exact and m.spans.shape == (50, 50)
    rec = tr.layer(0)
    total = ((rec.qend[0] - rec.qstart[0] + 1) * (rec.qanchor[0] >= 0)).sum().item()
    width = np.diff(m.key_edges)
    mass = np.nansum(m.spans * m.queries_per_bin[:, None] * width[None, :])
    assert mass == pytest.approx(total)
    np.testing.assert_allclose((m.key_use * width).sum(), total)


def test_snippet():
    toks = list("hello\nworld")
    assert snippet(toks, 0, 4) == "hello"
    assert snippet(toks, 3, 7) == "lo⏎wo"
    # one rule for raw and escaped newlines (model traces hold ByteTokenizer's display strings "\\n", "\\t")
    assert snippet(["a", "\\n", "b", "\\t", "c"], 0, 4) == snippet(list("a\nb\tc"), 0, 4) == "a⏎b⇥c"
    assert snippet(None, 0, 3) == "" and snippet(toks, 5, 2) == ""
    long = snippet(["x"] * 10_000, 0, 9_999, limit=20)
    assert len(long) < 40 and "…" in long


# --------------------------------------------------------------------------- RoutingExplorer
def test_routing_explorer_actions_change_state_and_figures():
    tr = _trace(length=120, heads=3, profile=[60, 119])
    ex = RoutingExplorer(tr)
    assert ex.query == 119 and ex.profile() is not None
    title = ex.figures()[0].layout.title.text
    assert ex.set_head(2) and ex.head == 2 and ex.figures()[0].layout.title.text != title
    assert ex.set_query(60) and ex.query == 60
    anchors, scores = ex.profile()
    chosen = ex.chosen()
    # the chosen slots are exactly the top-K of the profile (ties to the earlier anchor)
    order = sorted(zip(-scores, anchors))[: len(chosen)]
    assert [int(a) for _, a in order] == [r["anchor"] for r in chosen]
    assert ex.set_query_index(0) and ex.query == 0
    assert ex.pick(10.0, 77.4) and ex.query == 77
    assert ex.set_weight("gate") and ex.weight == "gate"
    assert ex.set_bins(32) and ex.max_bins == 32 and not ex.routing_map().exact
    report = ex.span_report()
    assert all({"rank", "anchor", "qstart", "qend", "score", "gate", "text"} <= set(r) for r in report)
    assert "Chosen spans of query 77" in ex.panels_html()[0]


@pytest.mark.parametrize("action, args, message", [
    ("set_head", (7,), "head"),
    ("set_head", ("0",), "head"),
    ("set_query", (10_000,), "not recorded"),
    ("set_query_index", (-1,), "query index"),
    ("set_layer", (3,), "not recorded"),
    ("set_weight", ("mean",), "weight"),
    ("set_bins", (2,), "max_bins"),
])
def test_routing_explorer_errors_reported_and_state_kept(action, args, message):
    ex = RoutingExplorer(_trace(length=64))
    state = (ex.layer, ex.head, ex.query, ex.weight, ex.max_bins)
    assert not getattr(ex, action)(*args)
    assert message in ex.error and (ex.layer, ex.head, ex.query, ex.weight, ex.max_bins) == state
    assert "⚠" in ex._status_html()


def test_routing_explorer_without_profile_or_tokens():
    tr = _trace(length=64, tokens=False)
    ex = RoutingExplorer(tr)
    assert ex.set_query(30) and ex.profile() is None
    fig = ex.figures()[1]
    assert any("profile" in (a.text or "") for a in fig.layout.annotations)
    assert ex.span_report()[0]["text"] == ""


def test_routing_explorer_compare_mode():
    tr_a = _trace(length=100, seed=0)
    tr_b = _trace(length=100, seed=0)
    same = RoutingExplorer(tr_a, compare=tr_b)
    assert same.agreement() == 1.0
    assert all(r["in_other"] for r in same.span_report())
    other = _trace(length=100, seed=0, cfg=SpanConfig.default().replace(search_power=1 / 3))
    cmp = RoutingExplorer(tr_a, compare=other, labels=("N=2", "N=3"))
    assert cmp.agreement() < 1.0
    fig = cmp.figures()[0]
    assert len([a for a in fig.layout.annotations if a.text in ("N=2", "N=3", "N=2 − N=3")]) == 3
    assert "N=3 chose anchors" in cmp.panels_html()[0]
    with pytest.raises(ValueError):
        RoutingExplorer(tr_a, compare=_trace(length=50))
    with pytest.raises(TypeError):
        RoutingExplorer(tr_a, compare="oracle")


def test_routing_explorer_widget_controls_drive_controller():
    tr = _trace(length=90, heads=2, profile=[45, 89])
    ex = RoutingExplorer(tr)
    ex.view
    c = ex._controls
    c["head"].value = 1
    assert ex.head == 1
    c["query"].value = 10
    assert ex.query == int(tr.queries[10])
    assert "Query 10" in ex._view.figure_widgets[1].figure.layout.title.text
    c["profiled"].value = 45
    assert ex.query == 45 and c["query"].value == 45
    c["weight"].value = "gate"
    assert ex.weight == "gate"
    detail = ex._view.figure_widgets[1]
    assert "Query 45" in detail.figure.layout.title.text


def test_routing_explorer_long_trace_ships_no_lxl_matrix():
    """64K tokens: the map sent to the browser has at most max_bins² cells per panel."""
    length = 65_536
    queries = torch.arange(0, length, 16)
    n, k = queries.numel(), 2
    cfg = SpanConfig.default()
    anchors = (queries[:, None] - torch.tensor([100, 5000])[None, :]).clamp_min(-1)
    qstart = torch.where(anchors >= 0, (anchors - 50).clamp_min(0), -1)
    res = SearchResult(qstart=qstart[None, None].int(), qanchor=anchors[None, None].int(),
                       qend=anchors[None, None].int(), values=torch.randn(1, 1, n, k))
    tr = RoutingTrace.from_search(res, queries, cfg, length=length)
    ex = RoutingExplorer(tr)
    fig = ex.figures()[0]
    cells = sum(np.asarray(t.z).size for t in fig.data if t.type == "heatmap")
    assert cells <= 3 * 240 * 240
    assert ex.set_query(int(queries[100])) and ex.error is None


# --------------------------------------------------------------------------- CoverageMap
def test_coverage_map_grid_histogram_and_actions():
    tr = _trace(length=200, heads=3, queries=list(range(0, 200, 2)))
    cm = CoverageMap(tr, far=0.5)
    cov, depth = cm.grid()
    np.testing.assert_allclose(cov[0], tr.coverage(0).numpy())
    assert cov.shape == (1, 3) and np.all((depth >= 0) & (depth <= 1))
    hist = cm.histogram()
    counts = tr.key_counts(0, 0).numpy()
    assert hist["unreached_keys"] == int((counts == 0).sum())
    np.testing.assert_allclose((hist["mean"] * np.diff(hist["edges"])).sum(), counts.sum())
    assert cm.select(0, 2) and cm.head == 2 and "head 2" in cm.summary()
    assert cm.set_include_window(False) and not cm.include_window
    cov_spans, _ = cm.grid()
    assert (cov_spans <= cov + 1e-12).all()  # spans alone never reach more than spans + window
    assert cm.set_bins(16) and len(cm.histogram()["edges"]) == 17
    assert not cm.select(0, 3) and "head" in cm.error and cm.head == 2
    assert not cm.set_include_window("yes") and not cm.include_window
    assert not cm.select(5, 0) and "not recorded" in cm.error
    assert len(cm.figures()) == 2


def test_look_back_and_shallow_heads():
    """A head whose anchors all sit 1 key back is flagged as never looking far back."""
    length = 400
    queries = torch.arange(20, length)
    n = queries.numel()
    near = (queries - 1)[:, None]
    far = torch.zeros(n, 1, dtype=torch.long)
    anchors = torch.stack([near, far])  # [H=2, n, 1]
    res = SearchResult(qstart=anchors[None].int(), qanchor=anchors[None].int(), qend=anchors[None].int(),
                       values=torch.zeros(1, 2, n, 1))
    tr = RoutingTrace.from_search(res, queries, SpanConfig.default().replace(num_spans=1), length=length)
    depth = look_back(tr, 0)
    assert depth[0] < 0.1 and depth[1] > 0.9
    cm = CoverageMap(tr)
    assert cm.shallow_heads() == [(0, 0)]
    assert "L0/h0" in cm.summary()


# --------------------------------------------------------------------------- MissedSpanDebugger
def _needle_case():
    needle = "The secret launch code is ZX-7481-QJ.\n"
    doc, ranges = plant(reference_text(3_000), needle, [0.2, 0.8])
    doc += "\nQuestion: the launch code?"
    q = len(doc) - 1
    tr = demo_trace(doc, needle=needle, queries=range(q - 3, q + 1), profile_queries=[q])
    return tr, ranges, q


def test_plant_and_char_to_token():
    doc, ranges = plant("line one\nline two\nline three\n", "NEEDLE\n", [0.0, 0.5, 1.0])
    assert all(doc[a:b + 1] == "NEEDLE\n" for a, b in ranges)
    assert char_to_token(["ab", "c", "def"], 0, 2) == (0, 1)
    assert char_to_token(["ab", "c", "def"], 3, 5) == (2, 2)
    with pytest.raises(ValueError):
        plant("text", "", [0.5])
    with pytest.raises(ValueError):
        plant("text", "x", [1.5])


def test_missed_span_debugger_reached_matches_trace_and_explains_misses():
    tr, ranges, q = _needle_case()
    dbg = MissedSpanDebugger(tr, [dict(start=a, end=b, unit="char", label=f"n{i}") for i, (a, b) in
                                  enumerate(ranges)], queries=[q])
    for c, (a, b) in enumerate(ranges):
        for h in range(4):
            frac = dbg.reached(c, 0, h)
            attended = [tr.reached(0, h, q, key) for key in range(a, b + 1)]
            assert frac == pytest.approx(np.mean(attended))
    misses = np.argwhere(dbg._grid == 0)
    assert len(misses)
    c, _, h = misses[0]
    assert (dbg.case, dbg.head) == (c, h)  # opens on the first miss
    why = dbg.explain()
    cs = why["covering_stripe"]
    ev = why["evidence"]
    assert cs is not None and cs["qstart"] <= ev.end and cs["qend"] >= ev.start
    assert why["profile"] and why["rank"] > tr.cfg(0).num_spans and why["margin"] > 0
    # rank from the profile, recomputed by brute force with the tie rule
    rec = tr.layer(0)
    vals, anchors = rec.stripe_values[h, 0].numpy(), rec.stripe_anchors[0].numpy()
    ok = (anchors >= 0) & np.isfinite(vals)
    ranked = sorted(zip(-vals[ok], anchors[ok]))
    assert [int(a) for _, a in ranked].index(cs["anchor"]) + 1 == why["rank"]
    assert "MISSED" in dbg.panels_html()[0]


def test_missed_span_debugger_actions_and_errors():
    tr, ranges, q = _needle_case()
    dbg = MissedSpanDebugger(tr, [(ranges[0][0], ranges[0][1]), (ranges[1][0], ranges[1][1])], queries=[q, q - 1])
    assert len(dbg.cases) == 4
    assert dbg.select(evidence=1, query=q - 1, head=2) and dbg.cases[dbg.case] == (1, q - 1) and dbg.head == 2
    state = (dbg.case, dbg.layer, dbg.head)
    assert not dbg.select(evidence=5) and "evidence" in dbg.error
    assert not dbg.select(head=9) and "head" in dbg.error
    assert not dbg.select(evidence=0, query=7) and "did not need" in dbg.error
    assert (dbg.case, dbg.layer, dbg.head) == state
    dbg.view
    dbg._controls["head"].value = 3
    assert dbg.head == 3 and "head 3" in dbg._view.figure_widgets[1].figure.layout.title.text


@pytest.mark.parametrize("evidence, message", [
    ([], "at least one"),
    ([(5, 2)], "outside"),
    ([dict(start=0, end=3, unit="line")], "unit"),
])
def test_missed_span_debugger_rejects_bad_evidence(evidence, message):
    tr, _, q = _needle_case()
    with pytest.raises(ValueError, match=message):
        MissedSpanDebugger(tr, evidence, queries=[q])


def test_missed_span_debugger_unrecorded_query_and_no_profile():
    tr = _trace(length=100, profile=[50])
    with pytest.raises(ValueError, match="not recorded"):
        MissedSpanDebugger(_trace(length=100, queries=[99]), [(3, 5)], queries=[50])
    dbg = MissedSpanDebugger(tr, [(3, 5)], queries=[99])
    why = dbg.explain()
    assert why["profile"] is False and why["rank"] is None


def test_every_view_exports_self_contained_html(tmp_path):
    tr = _trace(length=80)
    for view in (RoutingExplorer(tr), CoverageMap(tr), MissedSpanDebugger(tr, [(2, 4)])):
        text = view.to_html(tmp_path / f"{type(view).__name__}.html").read_text()
        assert "<script src=" not in text and text.count("Plotly.newPlot") >= 2
        assert view.static().to_dict()["data"]


def test_char_evidence_on_a_model_trace_uses_the_tokenizer():
    """A model's token strings escape newlines ("\\n" is two characters): character evidence must be mapped
    through the tokenizer, or every offset after a newline drifts."""
    from superlinear_lab.engine import Session
    from superlinear_lab.model import load_model

    model = load_model("tiny", backend="torch")
    doc, ranges = plant("first line\nsecond line\nthird line\n" * 6, "NEEDLE!\n", [0.5])
    session = Session(model, max_len=len(doc) + 8, progress=False)
    with session.trace(queries=[len(doc) - 1]) as tr:
        session.append(doc)
    a, b = ranges[0]
    dbg = MissedSpanDebugger(tr, [dict(start=a, end=b, unit="char")], tokenizer=model.tokenizer)
    ev = dbg.evidence[0]
    assert model.tokenizer.decode(tr.token_ids[ev.start:ev.end + 1].tolist()) == "NEEDLE!\n"
    with pytest.raises(ValueError, match="token_ids"):
        MissedSpanDebugger(_trace(length=40), [dict(start=1, end=2, unit="char")],
                           tokenizer=model.tokenizer)
