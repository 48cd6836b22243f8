"""Views on multi-layer traces whose layers route differently, and compare mode against a genuinely different
trace: a view that reads layer 0 instead of the chosen layer, or trace A where it should read B, fails here.

References are naive and self-contained: Python loops over the recorded tensors, no helper shared with the
views (no `_aggregate`, no `trace.key_counts`)."""
from __future__ import annotations

import numpy as np
import pytest

from superlinear_kernels import SpanConfig
from superlinear_lab.widgets import CoverageMap, RoutingExplorer
from superlinear_lab.widgets.demo import demo_trace, reference_text, stack_layers

LENGTH = 160


@pytest.fixture(scope="module")
def traces():
    text = reference_text(LENGTH)
    a = demo_trace(text, SpanConfig.default(), profile_queries=[80, LENGTH - 1])
    b = demo_trace(text, SpanConfig.default().replace(search_power=1 / 3, backward_factor=3.0), seed=1,
                   profile_queries=[80, LENGTH - 1])
    trace, other = stack_layers([a, b], [2, 5]), stack_layers([b, a], [2, 5])  # layer indices 2 and 5
    # the premise of every test below: the two layers (and the two traces) route differently
    assert not np.array_equal(trace.layer(2).qanchor.numpy(), trace.layer(5).qanchor.numpy())
    return trace, other


def _naive_counts(rec, length, head, include_window=True):
    """How many (recorded query, chosen span or window) pairs contain each key — loops only."""
    counts = [0] * length
    qs, qe, qa = rec.qstart[head].tolist(), rec.qend[head].tolist(), rec.qanchor[head].tolist()
    for i in range(len(qs)):
        for k in range(len(qs[i])):
            if qa[i][k] >= 0:
                for key in range(qs[i][k], qe[i][k] + 1):
                    counts[key] += 1
        if include_window:
            lo, hi = rec.window[i].tolist()
            if lo >= 0:
                for key in range(lo, hi + 1):
                    counts[key] += 1
    return counts


def _naive_map(rec, length, head):
    """Dense [query, key] map of the number of chosen spans of `head` containing each key (all queries)."""
    dense = [[0.0] * length for _ in range(length)]
    qs, qe, qa = rec.qstart[head].tolist(), rec.qend[head].tolist(), rec.qanchor[head].tolist()
    for row, q in enumerate(rec.queries.tolist()):
        for k in range(len(qs[row])):
            if qa[row][k] >= 0:
                for key in range(qs[row][k], qe[row][k] + 1):
                    dense[q][key] += 1
    return np.array(dense)


def test_coverage_map_reads_the_selected_layer(traces):
    trace, _ = traces
    cm = CoverageMap(trace, max_bins=LENGTH)
    for layer in (5, 2):
        for head in (0, 2):
            assert cm.select(layer, head)
            hist = cm.histogram()
            expected = _naive_counts(trace.layer(layer), LENGTH, head)
            np.testing.assert_allclose(hist["mean"], expected)
            assert hist["unreached_keys"] == sum(c == 0 for c in expected)
    # the two layers really differ for the heads checked (else reading layer 2 for layer 5 would pass)
    assert _naive_counts(trace.layer(5), LENGTH, 2) != _naive_counts(trace.layer(2), LENGTH, 2)
    # the grid: row r is layer trace.layers[r]
    cov, _ = cm.grid()
    for r, layer in enumerate(trace.layers):
        for head in range(cov.shape[1]):
            counts = _naive_counts(trace.layer(layer), LENGTH, head)
            assert cov[r, head] == pytest.approx(sum(c > 0 for c in counts) / LENGTH)
    assert "layers.2.routing" in cm.figures()[1].layout.title.text


def test_routing_explorer_reads_the_selected_layer(traces):
    trace, _ = traces
    ex = RoutingExplorer(trace, max_bins=LENGTH)
    for layer in (5, 2):
        assert ex.set_layer(layer) and ex.set_head(1) and ex.set_query(120)
        rec = trace.layer(layer)
        row = rec.queries.tolist().index(120)
        expected = [a for a in rec.qanchor[1, row].tolist() if a >= 0]
        assert [r["anchor"] for r in ex.chosen()] == expected
        m = ex.routing_map()
        assert m.exact
        np.testing.assert_allclose(np.nan_to_num(m.spans), _naive_map(rec, LENGTH, 1))
        lo, hi = rec.window[row].tolist()
        assert ex.document_highlights()["window"] == (lo, hi)
        detail = ex.figures()[1]
        chosen_trace = next(t for t in detail.data if t.name and t.name.startswith("top-"))
        assert list(chosen_trace.x) == expected
        assert f"layers.{layer}.routing" in detail.layout.title.text
    assert [r["anchor"] for r in ex.chosen()] != [
        a for a in trace.layer(5).qanchor[1, trace.layer(5).queries.tolist().index(120)].tolist() if a >= 0]


def test_compare_mode_against_a_different_trace(traces):
    trace, other = traces
    ex = RoutingExplorer(trace, compare=other, max_bins=LENGTH)
    assert ex.set_layer(2) and ex.set_head(0)
    rec_a, rec_b = trace.layer(2), other.layer(2)
    # agreement: naive fraction of queries with equal anchor sets
    same = [sorted(x for x in rec_a.qanchor[0, i].tolist()) == sorted(x for x in rec_b.qanchor[0, i].tolist())
            for i in range(rec_a.queries.numel())]
    assert ex.agreement() == pytest.approx(sum(same) / len(same))
    assert ex.agreement() < 1.0  # a genuinely different trace
    # B's choice and the "in B?" flags at a query where the two differ
    q = next(int(rec_a.queries[i]) for i in range(len(same) - 1, -1, -1) if not same[i])
    assert ex.set_query(q)
    row = rec_b.queries.tolist().index(q)
    b_anchors = [a for a in rec_b.qanchor[0, row].tolist() if a >= 0]
    assert [r["anchor"] for r in ex.chosen("B")] == b_anchors
    assert [r["in_other"] for r in ex.span_report()] == [r["anchor"] in b_anchors for r in ex.chosen("A")]
    detail = ex.figures()[1]
    b_trace = next(t for t in detail.data if t.name and t.name.endswith("'s choice"))
    assert list(b_trace.x) == b_anchors
    # every score drawn lies inside the score axis range (B's too), at a query where B's best score lies
    # above everything A shows (a range computed from A alone would cut it off)
    def a_shown():
        prof = ex.profile()
        return [r["score"] for r in ex.chosen("A")] + ([] if prof is None else prof[1].tolist())
    above = [int(x) for x in rec_a.queries.tolist()[::-1]
             if ex.set_query(int(x)) and ex.chosen("B") and max(r["score"] for r in ex.chosen("B")) > max(a_shown()) + 0.3]
    assert above, "no query where B's choice scores above A's (the test needs one)"
    assert ex.set_query(above[0])
    detail = ex.figures()[1]
    lo, hi = detail.layout.yaxis.range
    ys = [y for t in detail.data if t.type == "scatter" and t.y is not None for y in t.y if y is not None]
    assert ys and all(lo <= y <= hi for y in ys)
    # the maps: A's and B's from their own traces
    np.testing.assert_allclose(np.nan_to_num(ex.routing_map("B").spans), _naive_map(rec_b, LENGTH, 0))
    np.testing.assert_allclose(np.nan_to_num(ex.routing_map("A").spans), _naive_map(rec_a, LENGTH, 0))
    assert ex.set_layer(5)  # layer 5 of B is layer 2 of A (swapped): compare again from the other side
    np.testing.assert_allclose(np.nan_to_num(ex.routing_map("B").spans), _naive_map(other.layer(5), LENGTH, 0))


def test_views_name_the_model_and_weights_of_their_trace(model):
    """A trace captured from a model carries describe_model's line and every trace view shows it (a report of a
    randomly initialised model must not look like a trained one)."""
    import torch

    from superlinear_lab.widgets import CoverageMap, MissedSpanDebugger, RoutingExplorer

    ids = torch.tensor([list(b"\x01The pass key is 48213. Remember it. " * 8)])
    q = ids.shape[1] - 1
    with torch.no_grad(), model.trace(queries=[q], profile_queries=[q]) as trace:
        model(ids)
    assert trace.model and "superlinear-lab/tiny" in trace.model and "sha256" in trace.model
    views = [RoutingExplorer(trace, trace.tokens), CoverageMap(trace),
             MissedSpanDebugger(trace, "48213", queries=[q], tokenizer=model.tokenizer)]
    for view in views:
        assert trace.model in view.summary(), type(view).__name__


def _decode_png(uri: str) -> np.ndarray:
    """uint8 [H, W, 4] from a `data:image/png;base64,` URI of an 8-bit RGBA PNG whose rows all use filter 0 —
    a naive decoder written for this test (chunks walked by hand, no imaging library)."""
    import base64
    import struct
    import zlib

    assert uri.startswith("data:image/png;base64,")
    png = base64.b64decode(uri.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, size = 8, b"", None
    while at < len(png):
        n, tag = struct.unpack(">I4s", png[at:at + 8])
        body = png[at + 8:at + 8 + n]
        if tag == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 6), "expected 8-bit RGBA"
            size = (h, w)
        elif tag == b"IDAT":
            idat += body
        at += 12 + n
    h, w = size
    raw = zlib.decompress(idat)
    rows = [raw[r * (1 + 4 * w):(r + 1) * (1 + 4 * w)] for r in range(h)]
    assert all(row[0] == 0 for row in rows), "naive decoder: filter 0 only"
    return np.array([list(row[1:]) for row in rows], dtype=np.uint8).reshape(h, w, 4)


def _check_map_image(uri: str, rec, head: int):
    """The map image of (layer rec, head) is its chosen spans — pixel (query, key) drawn iff a chosen span of that
    query holds that key — plus green pixels, each on an anchor that query chose."""
    pixels = _decode_png(uri)
    assert pixels.shape[:2] == (LENGTH, LENGTH)  # exact map: one pixel per position
    green = np.all(pixels[..., :3] == [0x54, 0xA2, 0x4B], axis=-1) & (pixels[..., 3] == 255)
    drawn = pixels[..., 3] > 0
    expected = _naive_map(rec, LENGTH, head) > 0
    np.testing.assert_array_equal(drawn & ~green, expected & ~green)
    queries = rec.queries.tolist()
    for q, a in zip(*np.nonzero(green)):
        assert a in rec.qanchor[head, queries.index(q)].tolist(), (q, a)
    assert green.sum() > 0


def test_routing_map_images_show_the_selected_layer_and_head(traces):
    """What the browser draws of the map (PNG layout images) is the selected layer's and head's routing, in
    compare mode B's from B; the map's traces stay the same across layers and heads (so the browser relayouts)."""
    trace, other = traces
    ex = RoutingExplorer(trace, max_bins=LENGTH)
    uids = None
    for layer, head in ((2, 1), (5, 1), (5, 3), (2, 0)):
        assert ex.set_layer(layer) and ex.set_head(head)
        fig = ex.figures()[0]
        _check_map_image(fig.layout.images[0].source, trace.layer(layer), head)
        assert uids is None or [t.uid for t in fig.data] == uids
        uids = [t.uid for t in fig.data]
    cmp = RoutingExplorer(trace, compare=other, max_bins=LENGTH)
    assert cmp.set_layer(5) and cmp.set_head(2)
    fig = cmp.figures()[0]
    _check_map_image(fig.layout.images[0].source, trace.layer(5), 2)
    _check_map_image(fig.layout.images[1].source, other.layer(5), 2)


def test_picks_and_head_changes_send_only_layout_keys(traces):
    """In the browser: picking a query sends shapes (not the images); a head or layer change sends images,
    shapes and title; neither resends a trace of the map (they are relayouts, not redraws)."""
    trace, _ = traces
    ex = RoutingExplorer(trace, max_bins=LENGTH)
    ex.view
    pane = ex._view.figure_widgets[0]
    sent = []
    pane.send = lambda msg, *a, **k: sent.append(msg)
    pane._on_msg(pane, {"type": "sync"}, [])  # a browser asks for the figure
    assert sent[-1]["type"] == "full"
    sent.clear()
    assert ex.set_query(100)
    assert [m["traces"] for m in sent] == [{}] and set(sent[0]["layout"]) == {"shapes"}
    sent.clear()
    assert ex.set_head(2)
    assert [m["traces"] for m in sent] == [{}] and set(sent[0]["layout"]) == {"images", "shapes", "title"}
    sent.clear()
    assert ex.set_layer(5)
    assert [m["traces"] for m in sent] == [{}] and {"images", "shapes", "title"} <= set(sent[0]["layout"])
