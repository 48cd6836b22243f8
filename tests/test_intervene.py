"""`superlinear_lab.intervene`: routing overridden per (layer, head) — forcing anchors/spans, ablating branches —
always removed, recorded in traces, and able to turn a missed fact into a reached one on the shipped model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from superlinear_kernels import query_geometry
from superlinear_lab.engine import Session
from superlinear_lab.intervene import intervene
from superlinear_lab.trace import RoutingTrace

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Stripes are searched, spans are attended, the gate mixes them. " * 5  # 320 bytes


def _ids(model, text=TEXT):
    return torch.tensor([model.tokenizer.encode(text)])


def _no_overrides(model):
    return not any(lay.routing_overrides for _, lay in model.routing_layers())


def test_an_override_that_changes_nothing_changes_no_output(model):
    ids = _ids(model)
    q = ids.shape[1] - 1
    with torch.no_grad(), model.trace() as base:
        plain = model(ids)
    with torch.no_grad(), intervene(model, ablate={("layers.1", 0): [0]}, queries=[10 ** 6]):
        same = model(ids)
    assert torch.equal(plain, same)
    chosen = {(f"layers.{layer}", h): [int(a) for a in base.layer(layer).qanchor[h, q] if a >= 0]
              for layer in base.layers for h in range(4)}
    with torch.no_grad(), intervene(model, force=chosen, queries=[q]), model.trace() as tr:
        forced = model(ids)
    for layer in base.layers:
        assert torch.equal(tr.layer(layer).qanchor, base.layer(layer).qanchor)
    assert torch.allclose(forced, plain, atol=1e-4, rtol=0)
    assert _no_overrides(model)


def test_ablation_drops_the_slot_and_renormalises_the_gate(model):
    ids = _ids(model)
    layer, head = model.cfg.attention_layers[1], 2
    with torch.no_grad(), model.trace() as base:
        model(ids)
    with torch.no_grad(), model.intervene(ablate={(f"layers.{layer}.routing", head): [0]}), model.trace() as tr:
        model(ids)
    a, b = base.layer(layer), tr.layer(layer)
    valid = a.qanchor[head, :, 0] >= 0
    # the best branch is gone; the second one moves up and carries the whole gate
    assert torch.equal(b.qanchor[head, :, 0][valid], a.qanchor[head, :, 1][valid])
    assert bool((b.qanchor[head, :, 1] == -1).all())
    two = valid & (a.qanchor[head, :, 1] >= 0)
    assert torch.allclose(b.gate[head, two, 0], torch.ones(int(two.sum())))
    others = [h for h in range(4) if h != head]  # nothing upstream changed: other heads route as before
    assert torch.equal(b.qanchor[others], a.qanchor[others])
    first = model.cfg.attention_layers[0]
    assert torch.equal(tr.layer(first).qanchor, base.layer(first).qanchor)
    assert tr.overrides == [{"layer": f"layers.{layer}", "heads": {str(head): {"force": [], "ablate": [0]}},
                             "queries": None}]


def test_force_adds_the_anchor_with_its_geometry_and_its_real_score(model):
    ids = _ids(model)
    q = ids.shape[1] - 1
    layer, head = model.cfg.attention_layers[2], 1
    with torch.no_grad(), model.trace(queries=[q], profile_queries=[q]) as base:
        model(ids)
    rec = base.layer(layer)
    chosen = set(rec.qanchor[head, 0].tolist())
    geo = {st.anchor: st for st in query_geometry(model.cfg.span, q).candidates}
    anchor = next(a for a in sorted(geo) if a not in chosen and a > 50)  # a stripe the search did not choose
    col = rec.stripe_anchors[0].tolist().index(anchor)
    with torch.no_grad(), intervene(model, force={(f"layers.{layer}", head): [anchor]}, queries=[q]), \
            model.trace(queries=[q]) as tr:
        model(ids)
    got = tr.layer(layer)
    anchors = got.qanchor[head, 0].tolist()
    assert anchor in anchors
    k = anchors.index(anchor)
    assert (int(got.qstart[head, 0, k]), int(got.qend[head, 0, k])) == (geo[anchor].qstart, geo[anchor].qend)
    assert float(got.values[head, 0, k]) == pytest.approx(float(rec.stripe_values[head, 0, col]), abs=1e-4)
    kept = [a for a in anchors if a != anchor]  # the best searched branch stays, the weakest one made room
    assert kept == [int(rec.qanchor[head, 0, 0])]
    assert got.values[head, 0].tolist() == sorted(got.values[head, 0].tolist(), reverse=True)
    # an explicit span is clipped to keys before the window
    w = model.cfg.span.window_len
    with torch.no_grad(), intervene(model, force={(f"layers.{layer}", head): [(30, q)]}, queries=[q]), \
            model.trace(queries=[q]) as tr2:
        model(ids)
    spans = list(zip(tr2.layer(layer).qstart[head, 0].tolist(), tr2.layer(layer).qend[head, 0].tolist()))
    assert (30, q - w) in spans


@pytest.mark.parametrize("kwargs, message", [
    (dict(force={("layers.0", 0): [5]}), "layers.0"),  # a Mamba block, not an attention layer
    (dict(force={("layers.1", 4): [5]}), "head 4"),
    (dict(force={("layers.1", 0): [5, 6, 7]}), "K=2"),
    (dict(force={("layers.1", 0): [-3]}), "-3"),
    (dict(force={("layers.1", 0): [(9, 4)]}), "start <= end"),
    (dict(ablate={("layers.1", 0): [2]}), "slot 2"),
    (dict(ablate={"layers.1": [0]}), "(layer, head)"),
    (dict(force={("layers.1", 0): [1]}, ablate={("layers.1.routing", 1): [0], (1, 1): [1]}), "twice"),
    (dict(), "both are empty"),
    (dict(ablate={("layers.1", 0): [0]}, queries=[1.5]), "queries"),
])
def test_bad_overrides_are_refused_before_anything_is_installed(model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        with intervene(model, **kwargs):
            pass
    assert _no_overrides(model)


def test_removed_on_error_nested_and_with_a_session(model, tmp_path):
    with pytest.raises(RuntimeError, match="inside"):
        with intervene(model, ablate={("layers.1", 0): [0]}):
            assert not _no_overrides(model)
            raise RuntimeError("inside the block")
    assert _no_overrides(model)
    plain = Session(model, max_len=512, progress=False)
    plain.append(TEXT)
    s = Session(model, max_len=512, progress=False)
    with intervene(s, ablate={("layers.3", h): [0, 1] for h in range(4)}):
        with intervene(s, ablate={("layers.5", 0): [0]}):
            with s.trace() as tr:
                s.append(TEXT)
        assert [len(lay.routing_overrides) for _, lay in model.routing_layers()] == [0, 1, 0]
    assert _no_overrides(model)
    assert not torch.allclose(s.logits, plain.logits)
    assert bool((tr.layer(3).qanchor == -1).all()) and len(tr.overrides) == 2
    back = RoutingTrace.load(tr.save(tmp_path / "trace"))
    assert back.overrides == tr.overrides and back.model == tr.model and "tiny" in back.model


# --------------------------------------------------------------------------- the shipped model on real prose
def _licence_prompt(model, value: str, chars: int = 1200):
    """A fact planted a third of the way into the Apache licence text (prose the model never trained on), the
    question at the end. Returns (ids of document + answer, query q, evidence token range, answer ids)."""
    text = (Path(__file__).resolve().parents[1] / "LICENSE").read_text()[:chars]
    at = text.rfind("\n", 0, len(text) // 3) + 1
    fact = f"The magic number for Apache is {value}.\n"
    doc = (text[:at] + fact + text[at:]
           + "\nWhat is the magic number for Apache? The magic number for Apache is ")
    start = len(model.tokenizer.encode(text[:at] + "The magic number for Apache is "))
    answer = model.tokenizer.encode(value)
    ids = model.tokenizer.encode(doc)
    return ids + answer, len(ids) - 1, (start, start + len(answer) - 1), answer


def _answer_logprob(model, ids, q, answer, **overrides) -> float:
    """log P(answer | document) teacher-forced, with `overrides` applied at the answer's query positions."""
    positions = range(q, q + len(answer))
    with torch.no_grad():
        if overrides:
            with intervene(model, queries=positions, **overrides):
                logits = model(torch.tensor([ids]))
        else:
            logits = model(torch.tensor([ids]))
    logp = torch.log_softmax(logits[0, q:q + len(answer)].double(), dim=-1)
    return float(logp[torch.arange(len(answer)), torch.tensor(answer)].sum())


def test_forcing_the_covering_stripe_turns_a_missed_word_fact_into_a_reached_one(model):
    ids, q, (s, e), answer = _licence_prompt(model, "heron")
    with torch.no_grad(), model.trace(queries=[q]) as tr:
        model(torch.tensor([ids]))
    layer, head = tr.layers[0], 0
    assert int(tr.reach(layer, q, s, e)[1][head]) == 0, "expected the word fact to be missed"
    cover = [st for st in query_geometry(model.cfg.span, q).candidates if st.qstart <= s and st.qend >= e]
    assert cover, "some candidate stripe holds the evidence (coverage)"
    force = {(f"layers.{layer}", head): [cover[0].anchor]}
    with torch.no_grad(), intervene(model, force=force, queries=[q]), model.trace(queries=[q]) as forced:
        model(torch.tensor([ids]))
    assert int(forced.reach(layer, q, s, e)[1][head]) == e - s + 1  # now reached, whole
    before = _answer_logprob(model, ids, q, answer)
    after = _answer_logprob(model, ids, q, answer, force=force)
    assert abs(after - before) > 1e-2, (before, after)  # far beyond float noise (~1e-6)


def test_ablating_the_branches_that_carried_a_fact_lowers_its_probability(model):
    ids, q, (s, e), answer = _licence_prompt(model, "4817")
    with torch.no_grad(), model.trace(queries=[q]) as tr:
        model(torch.tensor([ids]))
    carriers = {}
    for layer in tr.layers:
        rec = tr.layer(layer)
        for h in range(rec.heads):
            slots = [k for k in range(rec.num_spans) if rec.qanchor[h, 0, k] >= 0
                     and rec.qstart[h, 0, k] <= e and rec.qend[h, 0, k] >= s]
            if slots:
                carriers[(f"layers.{layer}", h)] = slots
    assert len(carriers) >= 6, carriers  # the digit fact is reached by many heads
    before = _answer_logprob(model, ids, q, answer)
    after = _answer_logprob(model, ids, q, answer, ablate=carriers)
    assert before > -0.5 and after < before - 1.0, (before, after)
