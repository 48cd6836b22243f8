"""`TrainConfig.route_in_order` (issue 13, hop): a chain's second hop is supervised only from the second routed layer
on. CPU, a tiny random model, `fact_hop` / `fact_hop_quiz` rows at 1,024 tokens."""
from __future__ import annotations

import torch

from superlinear_lab import data as D
from superlinear_lab import train as T
from superlinear_lab.evaluate import capture_routing, evidence_pairs
from superlinear_lab.model import HybridLM, ModelConfig

TINY = {"d_model": 32, "d_ff": 64, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "ssm_head_dim": 16,
        "pattern": "M*M*", "span": {"sw_index": 3, "num_spans": 2, "backward_factor": 3.0, "forward_factor": 0.0,
                                    "search_power": 0.5, "span_power": 0.5}}


def _rows():
    return [D.make_example("fact_hop_quiz", 1024, s, "train") for s in (1, 2)] + \
        [D.make_example("fact_hop", 1024, 3, "train"), D.make_example("fact_quiz", 1024, 4, "train")]


def test_pair_ranks_follow_the_chain_order_of_evidence_pairs():
    rows = _rows()
    row, query, es, ee = evidence_pairs(rows)
    ranks = T.pair_ranks(rows, {"fact_hop", "fact_hop_quiz"})
    assert ranks.shape == row.shape
    for p in range(len(row)):
        ex = rows[int(row[p])]
        needs = ex.needs[int(query[p])]
        got = (int(es[p]), int(ee[p]))
        if ex.task == "fact_quiz":  # not listed: every pair in every layer
            assert ranks[p] == 0
            continue
        assert len(needs) == 2  # a hop place needs its pointer name, then its place
        name, place = (tuple(ex.evidence[i]) for i in needs)
        text = bytes(t for t in ex.ids if t < 256)
        assert int(ranks[p]) == (0 if got == name else 1)
        if ranks[p] == 1:  # the rank-1 range is the place: the place value's bytes, not the pointer name's
            values = ex.meta.get("values", [ex.meta["value"]])
            assert text[got[0] - 1:got[1] - 1].decode() in values
    assert int(ranks.sum()) == sum(int(r) for r in ranks) > 0
    assert T.pair_ranks(rows, set()).eq(0).all()


def _per_layer_reference(records, span, pairs, rivals, ranks):
    """The ordered loss rebuilt from the unordered one: per layer (ranked by index) the unordered loss of that layer
    alone over the pairs of rank ≤ the layer's rank; then the mean over layers."""
    layers = sorted(records)
    route, contrast = [], []
    for r, layer in enumerate(layers):
        keep = ranks <= r
        sub = tuple(t[keep] for t in pairs)
        a, b = T.routing_loss({layer: records[layer]}, span, sub, rivals)
        route.append(float(a))
        contrast.append(float(b))
    return sum(route) / len(layers), sum(contrast) / len(layers)


def test_ordered_loss_is_the_first_layer_on_first_hops_and_later_layers_on_both():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict(TINY), backend="torch")
    rows = _rows()
    with torch.no_grad(), capture_routing(model) as records:
        model(torch.tensor([ex.ids for ex in rows]))
    assert len(records) == 2
    pairs = evidence_pairs(rows)
    rivals = T.rival_ranges(rows)
    ranks = T.pair_ranks(rows, {"fact_hop", "fact_hop_quiz"})
    # plus, first, a pair whose range lies in the query's window (training skips it) of rank 1
    q = int(pairs[1][-1])
    pairs = tuple(torch.cat([torch.tensor([v]), t]) for v, t in zip((int(pairs[0][-1]), q, q - 2, q - 1), pairs))
    ranks = torch.cat([torch.tensor([1]), ranks])
    span = model.cfg.span
    route, contrast = T.routing_loss(records, span, pairs, rivals, ranks)
    want_route, want_contrast = _per_layer_reference(records, span, pairs, rivals, ranks)
    assert abs(float(route) - want_route) < 1e-5 and abs(float(contrast) - want_contrast) < 1e-5
    # the order matters here (rank-1 pairs with a supervisable stripe exist), and no ranks = all of rank 0
    plain = T.routing_loss(records, span, pairs, rivals)
    assert abs(float(plain[0]) - float(route)) > 1e-4
    zero = T.routing_loss(records, span, pairs, rivals, torch.zeros_like(ranks))
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])


def test_first_routed_layer_gets_no_gradient_from_second_hops():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict(TINY), backend="torch")
    rows = [D.make_example("fact_hop_quiz", 1024, 1, "train")]
    with torch.no_grad(), capture_routing(model) as records:
        model(torch.tensor([ex.ids for ex in rows]))
    leaves = {layer: (pos, routing, q1.clone().requires_grad_(), k.clone().requires_grad_())
              for layer, (pos, routing, q1, k) in records.items()}
    pairs = evidence_pairs(rows)
    ranks = T.pair_ranks(rows, {"fact_hop_quiz"})
    for pick, grads_in_first in ((ranks == 1, False), (ranks == 0, True)):
        for _, _, q1, k in leaves.values():
            q1.grad = k.grad = None
        loss = T.routing_loss(leaves, model.cfg.span, tuple(t[pick] for t in pairs), None, ranks[pick])[0]
        assert loss.item() > 0
        loss.backward()
        first, second = (leaves[layer] for layer in sorted(leaves))
        assert (first[2].grad is not None and first[2].grad.abs().sum() > 0) == grads_in_first
        assert second[2].grad.abs().sum() > 0 and second[3].grad.abs().sum() > 0


def test_config_default_keeps_every_layer_on_every_range():
    assert T.TrainConfig().route_in_order == []
