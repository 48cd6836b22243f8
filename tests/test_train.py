"""Training loop on CPU with a tiny model: loss goes down on a repeated batch, the routing loss has gradient,
and a run cut in two slices (checkpoint + resume) ends in exactly the state of one uninterrupted run."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from superlinear_lab import data as D
from superlinear_lab import train as T
from superlinear_lab.evaluate import capture_routing, evidence_pairs
from superlinear_lab.model import HybridLM, ModelConfig

TINY = {"d_model": 32, "d_ff": 64, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "ssm_head_dim": 16,
        "pattern": "M*M*", "span": {"sw_index": 3, "num_spans": 2, "backward_factor": 3.0, "forward_factor": 0.0,
                                    "search_power": 0.5, "span_power": 0.5}}


def tiny_config(**kw) -> T.TrainConfig:
    base = {"model": ModelConfig.from_dict(TINY).to_dict(), "stages": [[256, 2, 2], [320, 2, 2]], "warmup": 1,
            "probe_every": 0, "task_mix": {"niah": 1.0, "multi_hop": 1.0, "text": 0.5}}
    return T.TrainConfig(**{**base, **kw})


def test_steps_decrease_loss_on_a_fixed_batch():
    cfg = tiny_config(lr=3e-3)
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict(cfg.model), backend="oracle").train()
    opt = T.make_optimizer(model, cfg)
    batch = T.make_batch(cfg, 0)
    losses = []
    for _ in range(4):
        loss, stats = T.step_loss(model, cfg, batch, "cpu", autocast=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["loss"])
    assert losses[-1] < losses[0], losses


def test_routing_loss_reaches_search_query_and_keys():
    cfg = tiny_config()
    model = HybridLM(ModelConfig.from_dict(cfg.model), backend="oracle").train()
    examples = [T.make_batch(tiny_config(task_mix={"niah": 1.0}), 0)[0]]
    ids = torch.tensor([ex.ids for ex in examples])
    with capture_routing(model) as records:
        model(ids)
    loss = T.routing_loss(records, model.cfg.span, evidence_pairs(examples))[0]
    assert loss.item() > 0
    loss.backward()
    for i, layer in model.routing_layers():
        assert layer.q1_proj.weight.grad.abs().sum() > 0, i
        assert layer.k_proj.weight.grad.abs().sum() > 0, i


def test_resume_gives_the_same_state(tmp_path):
    cfg = tiny_config()
    T.train(cfg, tmp_path / "one", backend="oracle", progress=False)
    T.train(cfg, tmp_path / "two", backend="oracle", max_steps=3, progress=False)
    assert json.loads((tmp_path / "two" / "state.json").read_text())["step"] == 3
    T.train(cfg, tmp_path / "two", backend="oracle", progress=False)
    for name in ("model.safetensors", "optimizer_exp_avg.safetensors", "optimizer_exp_avg_sq.safetensors"):
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    one = json.loads((tmp_path / "one" / "state.json").read_text())
    two = json.loads((tmp_path / "two" / "state.json").read_text())
    assert one["step"] == two["step"] == cfg.total_steps and one["adam_steps"] == two["adam_steps"]
    lines = (tmp_path / "two" / T.LOG_FILE).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, cfg.total_steps + 1))
    with pytest.raises(ValueError, match="another TrainConfig"):
        T.train(tiny_config(lr=1.0), tmp_path / "two", backend="oracle", progress=False)


def test_export_writes_loadable_half_weights(tmp_path):
    from superlinear_lab.model import load_model

    cfg = tiny_config(stages=[[256, 1, 1]])
    T.train(cfg, tmp_path / "ck", backend="oracle", progress=False)
    from superlinear_lab.cli import main as cli_main

    assert cli_main(["train", "--ckpt", str(tmp_path / "ck"), "--export", str(tmp_path / "m")]) == 0  # float16
    assert load_file(str(tmp_path / "m" / "model.safetensors"))["embed.weight"].dtype == torch.float16
    model = load_model(path=tmp_path / "m", backend="torch")
    assert model.cfg == ModelConfig.from_dict(asdict(cfg)["model"])


def test_probe_reports_word_fact_copying_when_word_facts_are_trained(tmp_path):
    """With fact_word in the mix, the probe adds held-out word facts: accuracy and the answer-byte and first-byte
    accuracies, each a share of the probe rows' bytes or rows."""
    cfg = tiny_config(stages=[[512, 1, 2]], probe_every=1, probe_rows=2,
                      task_mix={"fact_word": 1.0, "niah": 1.0})
    T.train(cfg, tmp_path / "ck", backend="oracle", progress=False)
    entry = json.loads((tmp_path / "ck" / T.LOG_FILE).read_text().splitlines()[-1])
    for key in ("probe_acc", "probe_recall", "probe_word_acc", "probe_word_recall", "probe_word_byte_acc",
                "probe_word_first_byte"):
        assert 0.0 <= entry[key] <= 1.0, key
    assert entry["probe_word_first_byte"] in (0.0, 0.5, 1.0)  # rows, not bytes
    assert "probe_word_acc" not in T.probe(HybridLM(ModelConfig.from_dict(cfg.model)), tiny_config(probe_rows=2),
                                           256, autocast=False)


def test_batches_built_by_workers_are_the_batches_of_the_run(tmp_path):
    """Batches built in background processes come in step order and equal make_batch's, so a run with workers
    ends in exactly the weights of a run without them."""
    cfg = tiny_config(stages=[[256, 5, 2]], task_mix={"niah": 1.0, "fact_word": 1.0, "text": 0.5})
    got = list(T._batches(cfg, 1, 5, workers=2))
    assert [step for step, _ in got] == [1, 2, 3, 4]
    assert all([ex.ids for ex in exs] == [ex.ids for ex in T.make_batch(cfg, step)] for step, exs in got)
    T.train(cfg, tmp_path / "a", backend="oracle", progress=False)
    T.train(cfg, tmp_path / "b", backend="oracle", progress=False, workers=2, save_seconds=1e-6)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    slices = json.loads((tmp_path / "b" / "state.json").read_text())["slices"]
    assert slices[-1]["end_step"] == 5


def test_first_answer_weight_is_the_ce_of_each_answers_first_token():
    """w_first adds the mean CE at the query that predicts each answer's first token (text rows have none)."""
    cfg = T.TrainConfig(stages=[[512, 1, 3]], task_mix={"fact_word": 0.5, "text": 0.5}, w_lm=0.0, w_answer=0.0,
                        w_route=0.0, w_first=1.0, seed=3)
    batch = [D.make_example("fact_word", 512, 1, "train"), D.make_example("text", 512, 2, "train"),
             D.make_example("niah", 512, 3, "train")]
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict(cfg.model), backend="torch")
    loss, stats = T.step_loss(model, cfg, batch, "cpu", autocast=False)
    logits = model(torch.tensor([ex.ids for ex in batch]))
    want = []
    for b, ex in enumerate(batch):
        a0, a1 = ex.answer
        if a1 > a0:  # naive: the log-softmax at position a0 - 1 of the token at a0
            want.append(-torch.log_softmax(logits[b, a0 - 1].double(), -1)[ex.ids[a0]])
    assert len(want) == 2
    assert abs(float(loss) - float(sum(want) / len(want))) < 1e-4
    assert abs(stats["first"] - float(loss)) < 1e-6


def test_quiz_scores_each_value_and_not_the_questions_between_them():
    """loss_weights on a fact_quiz row: the answer mask covers exactly the asked values' bytes (the later questions
    are prompt), and the first-token mask the first byte of every value."""
    ex = D.make_example("fact_quiz", 1024, 4, "train")
    ids, mask, first = T.loss_weights([ex, D.make_example("text", 1024, 1, "train")], "cpu")
    assert len(ex.meta["values"]) >= 3
    asked = [ex.meta["values"][i] for i in ex.meta["order"]]
    scored = bytes(int(ids[0, q + 1]) for q in range(ids.shape[1] - 1) if mask[0, q])
    assert scored.decode() == "".join(asked)
    firsts = "".join(chr(int(ids[0, q + 1])) for q in range(ids.shape[1] - 1) if first[0, q])
    assert firsts == "".join(v[0] for v in asked)
    assert mask[1].sum() == 0 and first[1].sum() == 0


def _naive_stripe_losses(records, examples, window, b_f, sigma):
    """Stripe loss and rival contrast by enumeration, for search power 1/2 (F(i) = i²) and no forward span."""
    route, contrast = [], []
    for _, _, q1, k in records.values():
        group = q1.shape[1] // k.shape[1]
        r_terms, c_terms = [], []
        for b, ex in enumerate(examples):
            for q in ex.queries:
                for e in ex.needs[q]:
                    es, ee = ex.evidence[e]
                    sw_start = max(0, q - window + 1)
                    if es >= sw_start:
                        continue
                    t = q + 1
                    back = math.isqrt(b_f * b_f * t)
                    back += back * back != b_f * b_f * t  # ceil(b_f * sqrt(t))
                    stripes = []
                    i = sigma + 1
                    while i * i <= q + 1:
                        a = q + 1 - i * i
                        lo, hi = max(a - back, 0), min(a, q, ex.length - 1, sw_start - 1)
                        good = lo <= es and hi >= ee - 1
                        rival = not good and any(lo <= rs and hi >= re - 1 for rs, re in ex.rivals)
                        stripes.append((a, good, rival))
                        i += 1
                    if not any(g for _, g, _ in stripes):
                        continue
                    for h in range(q1.shape[1]):
                        s = torch.stack([q1[b, h, q].double() @ k[b, h // group, a].double() for a, _, _ in stripes])
                        good = torch.tensor([g for _, g, _ in stripes])
                        both = good | torch.tensor([r for _, _, r in stripes])
                        r_terms.append(torch.logsumexp(s, 0) - torch.logsumexp(s[good], 0))
                        if not torch.equal(both, good):
                            c_terms.append(torch.logsumexp(s[both], 0) - torch.logsumexp(s[good], 0))
        route.append(torch.stack(r_terms).mean())
        contrast.append(torch.stack(c_terms).mean())
    return float(sum(route) / len(route)), float(sum(contrast) / len(contrast))


def test_rival_contrast_is_the_evidence_share_among_evidence_and_rival_stripes():
    """routing_loss's two terms equal an enumeration over stripes: −log of the evidence stripes' mass among all
    candidates, and among the evidence's and the rivals' stripes (the other same-kind values of the row)."""
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict(TINY), backend="torch")
    examples = [D.make_example("fact_quiz", 1024, s, "train") for s in (4, 6)]
    assert all(len(ex.rivals) >= 3 for ex in examples)
    with torch.no_grad(), capture_routing(model) as records:
        model(torch.tensor([ex.ids for ex in examples]))
    pairs = evidence_pairs(examples)
    route, contrast = T.routing_loss(records, model.cfg.span, pairs, T.rival_ranges(examples))
    want_route, want_contrast = _naive_stripe_losses(records, examples, 15, 3, 3)
    assert abs(float(route) - want_route) < 1e-4 and abs(float(contrast) - want_contrast) < 1e-4
    assert float(contrast) > 0.05
    assert float(T.routing_loss(records, model.cfg.span, pairs)[1]) == 0  # no rivals given: no contrast
