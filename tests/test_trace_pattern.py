"""Dense attention patterns in a trace (`capture(pattern_queries=...)`, `attention_pattern`): they are the layer's
attention (pattern @ V == the attention output), zero outside span ∪ window, and survive save/load."""
from __future__ import annotations

import pytest
import torch

from superlinear_lab.trace import RoutingTrace

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Stripes are searched, spans are attended, the gate mixes them. " * 5


def test_pattern_is_the_layers_attention(model, tmp_path):
    ids = torch.tensor([model.tokenizer.encode(TEXT)])
    layer = model.cfg.attention_layers[1]
    att = dict(model.routing_layers())[layer]
    seen = {}
    hooks = [att.v_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o)),
             att.o_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("attended", i[0]))]
    queries = [7, 100, 250, ids.shape[1] - 1]
    try:
        with torch.no_grad(), model.trace(queries=queries, pattern_queries=queries[1:]) as tr:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    heads, kv, d = model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.head_dim
    pattern = tr.attention_pattern(layer)
    assert pattern.shape == (heads, 3, tr.length)
    assert torch.equal(tr.attention_pattern(layer, [250]), pattern[:, 1:2])
    v = seen["v"][0].view(-1, kv, d)
    attended = seen["attended"][0].view(-1, heads, d)
    rec = tr.layer(layer)
    for row, q in enumerate(queries[1:]):
        i = tr.query_index(q)
        lo, hi = rec.window[i].tolist()
        for h in range(heads):
            p = pattern[h, row]
            assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
            assert torch.allclose(p @ v[:, h // (heads // kv)], attended[q, h], atol=1e-5)
            reached = torch.tensor([tr.reached(layer, h, q, j) for j in range(tr.length)])
            assert float(p[~reached].abs().max()) == 0.0  # nothing outside the window and the chosen spans
            assert lo >= 0 and float(p[lo:hi + 1].sum()) > 0
    with pytest.raises(KeyError, match="query 7"):
        tr.attention_pattern(layer, [7])
    back = RoutingTrace.load(tr.save(tmp_path / "trace"))
    assert torch.equal(back.attention_pattern(layer), pattern)


def test_no_patterns_unless_asked(model):
    ids = torch.tensor([model.tokenizer.encode(TEXT[:64])])
    with torch.no_grad(), model.trace() as tr:
        model(ids)
    assert tr.layer(tr.layers[0]).pattern_queries.numel() == 0
    assert not any(lay.qkv_recorders for _, lay in model.routing_layers())
    with pytest.raises(KeyError, match="pattern_queries"):
        tr.attention_pattern(tr.layers[0], [3])
