"""RoutingTrace built from kernel outputs (no model): contents, derived views and the save/load round trip."""
from __future__ import annotations

import pytest
import torch

from superlinear_kernels import SpanConfig, stripe_scores, superlinear_attention
from superlinear_lab.trace import RoutingTrace, window_bounds

from helpers import random_inputs

L = 260


@pytest.fixture(scope="module")
def kernel_outputs():
    cfg = SpanConfig.default()
    q1, q2, k, v = random_inputs(1, 4, 2, L, L, 16, seed=3)
    _, routing = superlinear_attention(q1, q2, k, v, torch.arange(L), cfg, backend="torch", return_routing=True)
    profile = torch.tensor([5, 100, 259])
    scores = stripe_scores(q1[:, :, profile], k, profile, cfg)
    return cfg, routing, scores, profile


@pytest.fixture(scope="module")
def trace(kernel_outputs):
    cfg, routing, scores, profile = kernel_outputs
    return RoutingTrace.from_search([routing, routing], torch.arange(L), cfg, layers=[1, 3], stripe_scores=scores,
                                    profile_queries=profile, tokens=[f"t{i}" for i in range(L)])


def test_contract_shapes(trace, kernel_outputs):
    cfg, routing, _, _ = kernel_outputs
    assert trace.layers == [1, 3] and trace.names == ["layers.1.routing", "layers.3.routing"]
    assert trace.length == L and torch.equal(trace.queries, torch.arange(L))
    rec = trace.layer("layers.3.routing")
    assert rec.qstart.shape == (4, L, cfg.num_spans) and rec.qstart.dtype == torch.int32
    assert rec.gate.dtype == torch.float32 and rec.window.shape == (L, 2)
    assert torch.equal(rec.qanchor, routing.qanchor[0]) and torch.equal(rec.gate, routing.gate[0])
    assert rec.stripe_values.shape[:2] == (4, 3) and rec.stripes[0] == cfg.sw_index + 1
    assert trace.cfg(1) == cfg
    with pytest.raises(KeyError, match="not recorded"):
        trace.layer(2)


def test_profile_top_k_matches_routing(trace):
    rec = trace.layer(1)
    for row, q in enumerate(rec.profile_queries.tolist()):
        i = trace.query_index(q)
        for h in range(rec.heads):
            vals = rec.stripe_values[h, row]
            valid = rec.qanchor[h, i] >= 0
            order = vals.sort(descending=True, stable=True).indices[: int(valid.sum())]
            # Scores of a different query batch may round differently (BLAS blocking); anchors must agree.
            assert torch.equal(rec.stripe_anchors[row, order], rec.qanchor[h, i][valid].long())
            assert torch.allclose(vals[order], rec.values[h, i][valid], rtol=1e-5, atol=1e-5)


def test_reached_agrees_with_bounds(trace):
    rec = trace.layer(1)
    for q in (0, 20, 150, 259):
        i = trace.query_index(q)
        for key in range(0, q + 1, 7):
            lo, hi = rec.window[i].tolist()
            in_span = any(a >= 0 and a <= key <= b for a, b in zip(rec.qstart[2, i].tolist(), rec.qend[2, i].tolist()))
            assert trace.reached(1, 2, q, key) == (lo <= key <= hi or in_span)


def test_key_counts_and_coverage(trace):
    counts = trace.key_counts(1)
    rec = trace.layer(1)
    brute = torch.zeros(4, L, dtype=torch.int64)
    for h in range(4):
        for i in range(L):
            for a, b in zip(rec.qstart[h, i].tolist(), rec.qend[h, i].tolist()):
                if a >= 0 and b >= a:
                    brute[h, a:b + 1] += 1
            lo, hi = rec.window[i].tolist()
            if lo >= 0:
                brute[h, lo:hi + 1] += 1
    assert torch.equal(counts, brute)
    assert torch.equal(trace.coverage(1), (brute > 0).double().mean(dim=1))


def test_window_bounds():
    cfg = SpanConfig.default()  # W = 15
    w = window_bounds(cfg, torch.tensor([0, 14, 15, 100]), row_start=0)
    assert w.tolist() == [[0, 0], [0, 14], [1, 15], [86, 100]]
    assert window_bounds(cfg.replace(sw_index=0), torch.tensor([3])).tolist() == [[-1, -1]]
    assert window_bounds(cfg, torch.tensor([3, 10]), row_start=5).tolist() == [[-1, -1], [5, 10]]


def test_save_load_round_trip(trace, tmp_path):
    trace.save(tmp_path / "tr")
    back = RoutingTrace.load(tmp_path / "tr")
    assert back.layers == trace.layers and back.tokens == trace.tokens and back.length == trace.length
    for layer in trace.layers:
        a, b = trace.layer(layer), back.layer(layer)
        for f in ("qstart", "qanchor", "qend", "values", "gate", "window", "profile_queries", "stripes",
                  "stripe_anchors", "stripe_values"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        assert a.cfg == b.cfg
    assert back.summary() == trace.summary()
    with pytest.raises(FileExistsError):
        trace.save(tmp_path / "tr")


def test_subset_of_queries(kernel_outputs):
    cfg, routing, _, _ = kernel_outputs
    sel = torch.tensor([7, 50, 51, 200])
    sub = type(routing)(*(getattr(routing, f)[:, :, sel] for f in ("qstart", "qanchor", "qend", "values", "gate")))
    tr = RoutingTrace.from_search(sub, sel, cfg, length=L)
    assert torch.equal(tr.queries, sel) and tr.length == L
    with pytest.raises(KeyError):
        tr.query_index(8)
