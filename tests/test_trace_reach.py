"""The one reach rule (`evidence_reach`) against key enumeration, traces whose layers route differently, and
"the latest recording of a position wins" when a position is recorded twice."""
from __future__ import annotations

import random

import pytest
import torch

from superlinear_kernels import SearchResult, SpanConfig, superlinear_attention
from superlinear_lab.trace import RoutingTrace, evidence_reach

from helpers import random_inputs


def _naive_keys(spans, window, start, end):
    """Reference: sets of keys. Returns ([keys of evidence in span k ∪ window], keys of evidence in the union)."""
    win = set(range(window[0], window[1] + 1)) if window[0] >= 0 else set()
    need = set(range(start, end + 1))
    branches = [((set(range(a, b + 1)) if a >= 0 else set()) | win) & need for a, b in spans]
    union = set().union(win, *[set(range(a, b + 1)) for a, b in spans if a >= 0]) & need
    return [len(b) for b in branches], len(union)


def test_evidence_reach_matches_key_enumeration():
    rng = random.Random(7)
    rows = []
    for _ in range(400):
        spans = []
        for _ in range(3):
            if rng.random() < 0.25:
                spans.append((-1, -1))
            else:
                a = rng.randrange(0, 60)
                spans.append((a, a + rng.randrange(0, 15)))
        lo = rng.randrange(-1, 70)
        window = (-1, -1) if lo < 0 else (lo, lo + rng.randrange(0, 10))
        s = rng.randrange(0, 80)
        rows.append((spans, window, s, s + rng.randrange(0, 12)))
    qs = torch.tensor([[a for a, _ in r[0]] for r in rows])
    qe = torch.tensor([[b for _, b in r[0]] for r in rows])
    win = torch.tensor([r[1] for r in rows])
    per_branch, union = evidence_reach(qs, qe, win, torch.tensor([r[2] for r in rows]),
                                       torch.tensor([r[3] for r in rows]))
    for p, (spans, window, start, end) in enumerate(rows):
        want_branch, want_union = _naive_keys(spans, window, start, end)
        assert per_branch[p].tolist() == want_branch, (spans, window, start, end)
        assert int(union[p]) == want_union, (spans, window, start, end)


def _routing(anchor_of_head: list[list[int]], length: int, cfg: SpanConfig) -> SearchResult:
    """SearchResult [1, H, L, 1] where head h chooses span [a - 2, a] for every query q >= a, else nothing."""
    h = len(anchor_of_head)
    qs = torch.full((1, h, length, 1), -1, dtype=torch.int32)
    qa, qe = qs.clone(), qs.clone()
    for head, (a,) in enumerate(anchor_of_head):
        qs[0, head, a:, 0], qa[0, head, a:, 0], qe[0, head, a:, 0] = max(a - 2, 0), a, a
    values = torch.where(qa >= 0, torch.zeros(qa.shape), torch.full(qa.shape, float("-inf")))
    return SearchResult(qs, qa, qe, values)


def test_layers_that_route_differently_are_read_from_their_own_record():
    cfg = SpanConfig.default().replace(num_spans=1)  # W = 15
    length = 80
    # layer 1: head 0 reads keys [8, 10]; layer 3: head 0 reads [38, 40]; head 1 the other way round.
    tr = RoutingTrace.from_search({1: _routing([[10], [40]], length, cfg), 3: _routing([[40], [10]], length, cfg)},
                                  torch.arange(length), cfg)
    q = 79
    assert tr.reach(1, q, 8, 10)[1].tolist() == [3, 0] and tr.reach(3, q, 8, 10)[1].tolist() == [0, 3]
    assert tr.reach("layers.3.routing", q, 38, 40)[1].tolist() == [3, 0]
    assert tr.reached(1, 0, q, 9) and not tr.reached(3, 0, q, 9) and tr.reached(3, 1, q, 9)
    assert tr.reaching_spans(3, 0, q, 39) == [0] and tr.reaching_spans(1, 0, q, 39) == []
    assert tr.in_window(1, q, 70) and not tr.in_window(1, q, 60)
    counts1, counts3 = tr.key_counts(1, include_window=False), tr.key_counts(3, include_window=False)
    assert counts1[0, 9] == length - 10 and counts3[0, 9] == 0 and counts3[1, 9] == length - 10


# --------------------------------------------------------------------------- latest recording wins
class _Layer:
    def __init__(self, cfg):
        self.span_config = cfg
        self.routing_recorders: list = []


class _Model:
    """The recorder protocol of `RoutingTrace.capture`, driven by hand."""

    def __init__(self, cfg):
        self.layer = _Layer(cfg)
        self.token_recorders: list = []

    def routing_layers(self):
        return [(1, self.layer)]

    def run(self, positions, routing, ids):
        positions = torch.tensor(positions)
        for fn in list(self.token_recorders):
            fn(positions, torch.tensor([ids]))
        for fn in list(self.layer.routing_recorders):
            fn(positions, routing, None, None)


def test_latest_recording_of_a_position_wins():
    cfg = SpanConfig.default().replace(num_spans=1)
    model = _Model(cfg)
    first = _routing([[2]], 6, cfg)  # positions 0..5, anchor 2 from q = 2 on
    second = _routing([[4]], 6, cfg)
    second_tail = SearchResult(*(t[:, :, 3:6] for t in (second.qstart, second.qanchor, second.qend, second.values)))
    with RoutingTrace.capture(model) as tr:
        model.run([0, 1, 2, 3, 4, 5], first, [10, 11, 12, 13, 14, 15])
        model.run([3, 4, 5], second_tail, [23, 24, 25])  # re-recorded after a rollback to 3
    assert tr.queries.tolist() == [0, 1, 2, 3, 4, 5]
    assert tr.layer(1).qanchor[0, :, 0].tolist() == [-1, -1, 2, -1, 4, 4]
    assert tr.token_ids.tolist() == [10, 11, 12, 23, 24, 25]
    assert not model.layer.routing_recorders and not model.token_recorders


def test_latest_recording_wins_in_a_session(model, one_thread):
    from superlinear_lab.engine import Session

    s = Session(model, max_len=256, progress=False)
    with s.trace() as tr:
        s.append("Spans are attended; ")
        cp = s.checkpoint()
        s.append("the gate mixes them.")
        s.rollback(cp)
        s.append("stripes are searched.")
    fresh = Session(model, max_len=256, progress=False)
    with fresh.trace() as ref:
        fresh.append("Spans are attended; stripes are searched.")
    assert tr.length == ref.length == s.cursor
    assert torch.equal(tr.token_ids, ref.token_ids)
    for layer in ref.layers:
        assert torch.equal(tr.layer(layer).qanchor, ref.layer(layer).qanchor)
        assert torch.allclose(tr.layer(layer).values, ref.layer(layer).values, atol=1e-4)


def test_capture_routing_removes_hooks_and_keeps_the_latest_call(model, one_thread):
    from superlinear_lab.trace import capture_routing

    ids = torch.tensor([model.tokenizer.encode("abcdefgh")])
    with pytest.raises(RuntimeError, match="inside"):
        with capture_routing(model):
            raise RuntimeError("inside")
    assert not any(lay.routing_recorders for _, lay in model.routing_layers())
    with torch.no_grad(), capture_routing(model, layers=[model.cfg.attention_layers[-1]]) as records:
        model(ids[:, :4])
        model(ids)
    assert list(records) == [model.cfg.attention_layers[-1]]
    positions, routing, _, _ = records[model.cfg.attention_layers[-1]]
    assert positions.tolist() == list(range(8)) and routing.qanchor.shape[2] == 8


def test_random_routing_trace_reach_agrees_with_key_loop():
    cfg = SpanConfig.default()
    length = 120
    q1, q2, k, v = random_inputs(1, 4, 2, length, length, 16, seed=5)
    _, r1 = superlinear_attention(q1, q2, k, v, torch.arange(length), cfg, backend="torch", return_routing=True)
    tr = RoutingTrace.from_search([r1], torch.arange(length), cfg, layers=[0])
    rec = tr.layer(0)
    for q in (20, 77, 119):
        i = tr.query_index(q)
        lo, hi = rec.window[i].tolist()
        for start, end in ((0, 3), (10, 30), (q - 20, q)):
            _, got = tr.reach(0, q, start, end)
            for h in range(4):
                keys = [j for j in range(start, end + 1)
                        if (lo <= j <= hi) or any(a <= j <= b for a, b in zip(rec.qstart[h, i].tolist(),
                                                                               rec.qend[h, i].tolist()) if a >= 0)]
                assert int(got[h]) == len(keys)
