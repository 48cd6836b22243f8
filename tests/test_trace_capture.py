"""RoutingTrace captured from model runs: hooks always removed, the model unchanged, subsets and profiles
consistent with the full recording, tokens from the session, save/load of a captured trace."""
from __future__ import annotations

import pytest
import torch

from superlinear_kernels import query_geometry
from superlinear_lab.engine import Session
from superlinear_lab.trace import RoutingTrace

TEXT = "Stripes are searched, spans are attended, the gate mixes them. " * 5  # 320 bytes


pytestmark = pytest.mark.usefixtures("one_thread")


def hook_counts(model):
    return [len(layer.routing_recorders) for _, layer in model.routing_layers()] + [len(model.token_recorders)]


def run(model, queries=None, profile_queries=None, chunk_size=100):
    s = Session(model, max_len=512, chunk_size=chunk_size, progress=False)
    with s.trace(queries=queries, profile_queries=profile_queries) as tr:
        s.append(TEXT)
        s.generate(8)
    return s, tr


def test_full_trace_contents(model):
    s, tr = run(model)
    assert isinstance(tr, RoutingTrace) and not any(hook_counts(model))
    assert tr.length == s.cursor and torch.equal(tr.queries, torch.arange(s.cursor))
    assert tr.names == [f"layers.{i}.routing" for i in model.cfg.attention_layers]
    assert tr.tokens == model.tokenizer.token_strings(s.ids.tolist()) and torch.equal(tr.token_ids, s.ids)
    cfg = model.cfg.span
    rec = tr.layer(tr.layers[-1])
    assert rec.qanchor.shape == (model.cfg.n_heads, s.cursor, cfg.num_spans)
    assert torch.allclose(rec.gate.sum(-1), torch.ones(()))
    for q in (0, 15, 16, 200, s.cursor - 1):  # every chosen anchor is a candidate stripe with the spec's span
        geo = {st.anchor: st for st in query_geometry(cfg, q).candidates}
        i = tr.query_index(q)
        for h in range(rec.heads):
            for k in range(rec.num_spans):
                a = int(rec.qanchor[h, i, k])
                if a < 0:
                    continue
                assert a in geo and (int(rec.qstart[h, i, k]), int(rec.qend[h, i, k])) == (geo[a].qstart, geo[a].qend)
    assert tr.coverage(tr.layers[0]).shape == (model.cfg.n_heads,)


def test_tracing_does_not_change_the_model(model):
    plain = Session(model, max_len=512, chunk_size=100, progress=False)
    plain.append(TEXT)
    out_plain = plain.generate(8)
    traced, _ = run(model)
    assert torch.equal(plain.logits, traced.logits) and traced.ids[-8:].tolist() == out_plain


def test_subset_and_profiles_match_full_recording(model):
    _, full = run(model)
    chosen = [3, 17, 100, 199, 200, 319]
    _, sub = run(model, queries=chosen, profile_queries=[17, 200, 319])
    assert sub.queries.tolist() == chosen
    rows = torch.tensor(chosen)
    for layer in full.layers:
        a, b = full.layer(layer), sub.layer(layer)
        for f in ("qstart", "qanchor", "qend", "values", "gate"):
            assert torch.equal(getattr(a, f)[:, rows], getattr(b, f)), (layer, f)
        assert torch.equal(a.window[rows], b.window)
        assert b.profile_queries.tolist() == [17, 200, 319]
        for row, q in enumerate(b.profile_queries.tolist()):  # the profile's best stripes are the chosen anchors
            i = sub.query_index(q)
            vals = b.stripe_values[:, row]
            for h in range(b.heads):
                n_valid = int((b.qanchor[h, i] >= 0).sum())
                top = torch.topk(vals[h], n_valid).indices
                assert set(b.stripe_anchors[row, top].tolist()) == set(b.qanchor[h, i, :n_valid].tolist())


def test_hooks_removed_on_error(model):
    s = Session(model, max_len=512, progress=False)
    with pytest.raises(RuntimeError, match="inside"):
        with s.trace():
            s.append("abc")
            raise RuntimeError("inside the block")
    assert not any(hook_counts(model))

    def explode(*args):
        raise ValueError("recorder failure")

    with pytest.raises(ValueError, match="recorder failure"):
        with model.trace() as tr:
            model.routing_layers()[0][1].routing_recorders.append(explode)
            try:
                s.append("abcdef")
            finally:
                model.routing_layers()[0][1].routing_recorders.remove(explode)
    assert not any(hook_counts(model)) and s.cursor == 3  # the failed append was undone
    with pytest.raises(ValueError, match="attention layers"):
        with model.trace(layers=[0]):
            pass
    assert not any(hook_counts(model))


def test_nested_traces_and_layer_filter(model):
    s = Session(model, max_len=512, progress=False)
    last = model.cfg.attention_layers[-1]
    with s.trace(layers=[last]) as outer:
        s.append("first part. ")
        with s.trace() as inner:
            s.append("second part.")
        assert hook_counts(model) == [0] * (len(model.cfg.attention_layers) - 1) + [1, 1]
    assert not any(hook_counts(model))
    assert outer.layers == [last] and outer.queries.numel() == s.cursor
    assert inner.layers == model.cfg.attention_layers and inner.queries.tolist() == list(range(12, s.cursor))
    assert torch.equal(inner.layer(last).qanchor, outer.layer(last).qanchor[:, 12:])


def test_captured_trace_round_trip(model, tmp_path):
    _, tr = run(model, queries=range(0, 328, 5), profile_queries=[100, 300])
    tr.save(tmp_path / "trace")
    back = RoutingTrace.load(tmp_path / "trace")
    assert back.summary() == tr.summary() and back.tokens == tr.tokens
    first = tr.layers[0]
    assert torch.equal(back.layer(first).stripe_values, tr.layer(first).stripe_values)
    assert torch.equal(back.token_ids, tr.token_ids)
