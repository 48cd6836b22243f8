"""MissedSpanDebugger v2: every covering stripe with rank and margin (against a naive reference), the chosen
branch for reached cells, multi-layer traces whose layers route differently, evidence found by string, and the
read diagnosis / try-it on the shipped model checked against direct interventions."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from superlinear_kernels import SpanConfig, stripe_scores, superlinear_attention
from superlinear_lab.intervene import intervene
from superlinear_lab.trace import RoutingTrace
from superlinear_lab.widgets import MissedSpanDebugger
from superlinear_lab.widgets.missed import find_text

from helpers import random_inputs

L = 300


def _naive_offsets(cfg: SpanConfig, limit: int) -> dict[int, int]:
    """{stripe i: F(i)} for F(i) <= limit, brute force from the definition F(i) = ceil(i^(1/p)) (first offset
    strictly increasing: each stripe's offset is the smallest integer > previous with i^(1/p) <= it)."""
    out, prev, i = {}, 0, 1
    while True:
        f = max(prev + 1, math.ceil(i ** (1.0 / cfg.search_power) - 1e-9))
        if f > limit:
            return out
        out[i], prev, i = f, f, i + 1


def _naive_covering(trace: RoutingTrace, layer: int, head: int, q: int, start: int, end: int) -> list[dict]:
    """Every candidate stripe of q whose span overlaps [start, end], with score, rank (ties → earlier anchor)
    and margin to the K-th chosen score; whole coverers first, each group by rank. Independent of the view."""
    rec = trace.layer(layer)
    cfg = rec.cfg
    t = q + 1
    back = math.ceil(cfg.backward_factor * t ** cfg.span_power - 1e-9)
    fwd = math.ceil(cfg.forward_factor * t ** cfg.span_power - 1e-9)
    w = cfg.window_len
    p = rec.profile_queries.tolist().index(q)
    score = {int(a): float(v) for a, v in zip(rec.stripe_anchors[p], rec.stripe_values[head, p]) if v > -math.inf}
    order = sorted(score, key=lambda a: (-score[a], a))
    i = trace.query_index(q)
    kth = min(float(v) for v in rec.values[head, i] if v > -math.inf)
    out = []
    for stripe, f in _naive_offsets(cfg, t).items():
        a = t - f
        if stripe <= cfg.sw_index or a < 0:
            continue
        lo, hi = max(a - back, 0), min(a + fwd, q, (max(q - w + 1, 0) - 1) if w else q)
        if hi < lo or hi < start or lo > end:
            continue
        out.append(dict(anchor=a, whole=lo <= start and hi >= end, rank=order.index(a) + 1,
                        margin=kth - score[a], qstart=lo, qend=hi))
    return sorted(out, key=lambda c: (not c["whole"], c["rank"]))


@pytest.fixture(scope="module")
def two_layer_trace():
    """Layers 1 and 3 route differently (different random Q/K), both with a full profile of the last query."""
    cfg = SpanConfig.default()
    results, profiles = {}, {}
    last = torch.tensor([L - 1])
    for layer, seed in ((1, 11), (3, 12)):
        q1, q2, k, v = random_inputs(1, 4, 2, L, L, 16, seed=seed)
        _, results[layer] = superlinear_attention(q1, q2, k, v, torch.arange(L), cfg, backend="torch",
                                                  return_routing=True)
        profiles[layer] = stripe_scores(q1[:, :, last], k, last, cfg)
    return RoutingTrace.from_search(results, torch.arange(L), cfg, stripe_scores=profiles, profile_queries=last,
                                    tokens=[chr(97 + i % 26) for i in range(L)])


EVIDENCE = [(20, 24), (60, 66), (120, 121), (200, 215), (250, 262)]


def test_every_covering_stripe_with_rank_and_margin_against_a_naive_reference(two_layer_trace):
    tr = two_layer_trace
    q = L - 1
    assert not torch.equal(tr.layer(1).qanchor, tr.layer(3).qanchor)
    dbg = MissedSpanDebugger(tr, EVIDENCE, queries=[q])
    checked_misses = 0
    for c, (s, e) in enumerate(EVIDENCE):
        for layer in (1, 3):
            for h in range(4):
                x = dbg.explain(c, layer, h)
                assert x["layer"] == layer and x["head"] == h
                want_reached = sum(tr.reached(layer, h, q, key) for key in range(s, e + 1)) / (e - s + 1)
                assert dbg.reached(c, layer, h) == pytest.approx(want_reached)
                if x["reached"] > 0:
                    continue
                checked_misses += 1
                want = _naive_covering(tr, layer, h, q, s, e)
                got = [dict(anchor=cs["anchor"], whole=cs["whole"], rank=cs["rank"],
                            margin=pytest.approx(cs["margin"]), qstart=cs["qstart"], qend=cs["qend"])
                       for cs in x["covering"]]
                assert got == want, (c, layer, h)
                lead = x["covering_stripe"]
                assert lead["anchor"] == want[0]["anchor"] and x["rank"] == want[0]["rank"]
                assert x["rank"] == min(w["rank"] for w in want if w["whole"] == want[0]["whole"])
    assert checked_misses >= 10


def test_reached_cells_name_the_chosen_branch_not_an_unchosen_stripe(two_layer_trace):
    tr = two_layer_trace
    q = L - 1
    dbg = MissedSpanDebugger(tr, EVIDENCE, queries=[q])
    seen = 0
    for c, (s, e) in enumerate(EVIDENCE):
        for layer in (1, 3):
            rec = tr.layer(layer)
            i = tr.query_index(q)
            for h in range(4):
                x = dbg.explain(c, layer, h)
                if x["reached"] == 0:
                    continue
                slots = [k for k in range(rec.num_spans) if rec.qanchor[h, i, k] >= 0
                         and rec.qstart[h, i, k] <= e and rec.qend[h, i, k] >= s]
                if not slots:
                    assert x["in_window"] > 0 and x["covering_stripe"] is None
                    continue
                seen += 1
                cs = x["covering_stripe"]
                assert cs["slot"] in slots and cs["anchor"] == int(rec.qanchor[h, i, cs["slot"]])
                assert x["rank"] == cs["slot"] + 1 and x["margin"] is None
                assert cs["gate"] == pytest.approx(float(rec.gate[h, i, cs["slot"]]))
    assert seen >= 3


def test_the_view_reads_the_selected_layer(two_layer_trace):
    tr = two_layer_trace
    q = L - 1
    dbg = MissedSpanDebugger(tr, EVIDENCE, queries=[q])
    # a cell whose answer differs between the layers
    cell = next((c, h) for c in range(len(EVIDENCE)) for h in range(4)
                if (dbg.reached(c, 1, h) > 0) != (dbg.reached(c, 3, h) > 0))
    c, h = cell
    e, _ = dbg.cases[c]
    assert dbg.select(evidence=e, query=q, layer="layers.3.routing", head=h)
    x = dbg.explain()
    i = tr.query_index(q)
    assert x["layer"] == 3 and [ch["anchor"] for ch in x["chosen"]] == [
        a for a in tr.layer(3).qanchor[h, i].tolist() if a >= 0]
    assert (x["reached"] > 0) == (dbg.reached(c, 3, h) > 0)
    assert "layers.3.routing" in dbg.panels_html()[0] and "head %d" % h in dbg.figures()[1].layout.title.text


def test_a_click_on_the_grid_selects_that_cell(two_layer_trace):
    """The grid's rows are (evidence, query) × layer, its columns heads: a click inside a cell (data coordinates
    as the browser sends them: head, row index) selects exactly that layer and head; the selection box (a layout
    shape) moves there; a click outside the rows is refused and changes nothing."""
    tr = two_layer_trace
    dbg = MissedSpanDebugger(tr, EVIDENCE, queries=[L - 1])
    dbg.view
    pane = dbg._view.figure_widgets[0]
    for row, head in ((3, 2), (0, 1), (9, 3), (4, 0)):
        pane.area_click("xy", head + 0.3, row - 0.4)
        case, r = divmod(row, len(tr.layers))
        assert (dbg.case, dbg.layer, dbg.head) == (case, tr.layers[r], head), (row, head)
        assert dbg.explain()["layer"] == tr.layers[r] and dbg.explain()["evidence"] == dbg.evidence[case]
        box = pane.figure.layout.shapes[0]
        assert (box.x0, box.x1, box.y0, box.y1) == (head - 0.5, head + 0.5, row - 0.5, row + 0.5)
    before = (dbg.case, dbg.layer, dbg.head)
    pane.area_click("xy", 1.0, len(EVIDENCE) * len(tr.layers) + 0.2)
    assert "grid row" in dbg.error and (dbg.case, dbg.layer, dbg.head) == before


def test_evidence_by_string_and_a_panel_that_wraps(two_layer_trace):
    tr = two_layer_trace
    text = "".join(tr.tokens)
    assert find_text(tr, text[40:47]) == (14, 20) and find_text(tr, text[40:47], occurrence=1) == (40, 46)
    assert find_text(tr, "abc", occurrence=1) == (26, 28) and find_text(tr, "abc", occurrence=-1)[0] == 26 * 11
    with pytest.raises(ValueError, match="not found"):
        find_text(tr, "zyx")
    with pytest.raises(ValueError, match="occurrence=99"):
        find_text(tr, "abc", occurrence=99)
    dbg = MissedSpanDebugger(tr, ["opq", dict(text="hij", occurrence=2, label="third hij")], queries=[L - 1])
    assert (dbg.evidence[0].start, dbg.evidence[0].end) == (14, 16)
    assert (dbg.evidence[1].start, dbg.evidence[1].end, dbg.evidence[1].label) == (59, 61, "third hij")
    html = dbg.panels_html()[0]
    assert "nowrap" not in html and "white-space:normal" in html
    ev = dbg.evidence[dbg.cases[dbg.case][0]]  # the text pane marks the evidence and the query
    assert html.count("<i class=e>") == ev.end - ev.start + 1 and html.count("<i class=q>") == 1
    x = dbg.explain()
    if x["reached"] == 0:
        assert html.count("<tr>") >= len(x["covering"]) + len(x["chosen"])


# --------------------------------------------------------------------------- read diagnosis and try-it (model)
@pytest.fixture(scope="module")
def word_fact(model, one_thread):
    text = (Path(__file__).resolve().parents[1] / "LICENSE").read_text()[:1200]
    at = text.rfind("\n", 0, len(text) // 3) + 1
    doc = (text[:at] + "The magic number for Apache is heron.\n" + text[at:]
           + "\nWhat is the magic number for Apache? The magic number for Apache is ")
    ids = model.tokenizer.encode(doc)
    q = len(ids) - 1
    with torch.no_grad(), model.trace(queries=[q], profile_queries=[q]) as tr:
        model(torch.tensor([ids]))
    return tr, ids, q


def _logprob(model, ids, q, answer, **overrides):
    full = torch.tensor([ids + answer[:-1]])
    with torch.no_grad(), (intervene(model, queries=range(q, q + len(answer)), **overrides) if overrides
                           else torch.no_grad()):
        logits = model(full)
    logp = torch.log_softmax(logits[0, q:].double(), dim=-1)
    return float(logp[torch.arange(len(answer)), torch.tensor(answer)].sum())


def test_read_diagnosis_and_try_it_agree_with_direct_interventions(model, word_fact):
    tr, ids, q = word_fact
    dbg = MissedSpanDebugger(tr, "heron", queries=[q], model=model, answer="heron")
    answer = model.tokenizer.encode("heron")
    layer, head = tr.layers[0], 0
    assert dbg.select(layer=layer, head=head) and dbg.explain()["reached"] == 0
    r = dbg.read()
    assert r["base"]["logprob"] == pytest.approx(_logprob(model, ids, q, answer), abs=1e-4)
    rec, i = tr.layer(layer), tr.query_index(q)
    assert [b["anchor"] for b in r["branches"]] == [a for a in rec.qanchor[head, i].tolist() if a >= 0]
    for b in r["branches"]:
        assert b["gate"] == pytest.approx(float(rec.gate[head, i, b["slot"]]), abs=1e-5)
        assert 0.0 <= b["evidence_mass"] < 1e-3  # missed: its span ∪ window holds no evidence key
        want = _logprob(model, ids, q, answer, ablate={(f"layers.{layer}", head): [b["slot"]]})
        assert math.log(b["prob_without"]) == pytest.approx(want, abs=1e-4)
    assert dbg.tried() is None
    assert dbg.try_it() and dbg.error is None
    t = dbg.tried()
    assert t["reached_after"] == 1.0 and t["anchor"] == dbg.explain()["covering"][0]["anchor"]
    assert 0 < t["forced_gate"] < 1 and t["forced_evidence_mass"] > 0  # now read, a little
    assert sum(b["gate"] for b in t["branches"]) == pytest.approx(1.0, abs=1e-5)
    want = _logprob(model, ids, q, answer, force=t["force"])
    assert math.log(t["forced"]["prob"]) == pytest.approx(want, abs=1e-4)
    assert abs(math.log(t["forced"]["prob"]) - math.log(t["base"]["prob"])) > 1e-2
    assert "Try it" in dbg.panels_html()[0] and "Read" in dbg.panels_html()[0]
    cf = dbg.counterfactual_trace()
    assert cf.length == tr.length and cf.overrides and int(cf.reach(layer, q, *_span(dbg))[1][head]) > 0
    assert int(tr.reach(layer, q, *_span(dbg))[1][head]) == 0
    from superlinear_lab.widgets import RoutingExplorer

    explorer = RoutingExplorer(tr, tr.tokens, compare=cf)  # the counterfactual in compare mode
    assert explorer.set_layer(layer) and explorer.set_head(head) and explorer.set_query(q)
    assert t["anchor"] in [c["anchor"] for c in explorer.chosen("B")]
    assert t["anchor"] not in [c["anchor"] for c in explorer.chosen("A")]
    assert explorer.figures()


def _span(dbg):
    ev = dbg.evidence[0]
    return ev.start, ev.end


def test_try_it_button_and_refusals(model, word_fact):
    tr, ids, q = word_fact
    plain = MissedSpanDebugger(tr, "heron", queries=[q])
    assert not plain.try_it() and "model=" in plain.error
    dbg = MissedSpanDebugger(tr, "heron", queries=[q], model=model, answer="heron")
    dbg.view
    button = dbg._controls["try_it"]
    button.click()
    assert dbg.tried() is not None and "Try it" in dbg._view.panels[0].value
    with pytest.raises(ValueError, match="model="):
        MissedSpanDebugger(tr, "heron", queries=[q], answer="heron")


def test_evidence_attention_mass_against_a_naive_softmax(model, one_thread):
    text = (Path(__file__).resolve().parents[1] / "LICENSE").read_text()[:1200]
    at = text.rfind("\n", 0, len(text) // 3) + 1
    doc = (text[:at] + "The magic number for Apache is 4817.\n" + text[at:]
           + "\nWhat is the magic number for Apache? The magic number for Apache is ")
    ids = model.tokenizer.encode(doc)
    q = len(ids) - 1
    layer = model.cfg.attention_layers[-1]
    att = dict(model.routing_layers())[layer]
    seen = {}
    hooks = [att.q2_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q2", o)),
             att.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))]
    try:
        with torch.no_grad(), model.trace(queries=[q], profile_queries=[q]) as tr:
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    dbg = MissedSpanDebugger(tr, "4817", queries=[q], model=model, answer="4817")
    ev = dbg.evidence[0]
    d, heads = model.cfg.head_dim, model.cfg.n_heads
    group = heads // model.cfg.n_kv_heads
    rec, i = tr.layer(layer), tr.query_index(q)
    lo, hi = rec.window[i].tolist()
    checked = 0
    for head in range(heads):
        if dbg.reached(0, layer, head) == 0:
            continue
        qv = seen["q2"][0, q].view(heads, d)[head]
        keys = seen["k"][0].view(-1, model.cfg.n_kv_heads, d)[:, head // group]
        r = dbg.read(0, layer, head)
        for b in r["branches"]:
            allowed = [j for j in range(q + 1) if b["qstart"] <= j <= b["qend"] or lo <= j <= hi]
            logits = torch.stack([keys[j] @ qv for j in allowed]) / math.sqrt(d)
            p = torch.softmax(logits.double(), dim=0)
            want = sum(float(p[n]) for n, j in enumerate(allowed) if ev.start <= j <= ev.end)
            assert b["evidence_mass"] == pytest.approx(want, abs=1e-4)
            checked += want > 0.01
    assert checked >= 1
