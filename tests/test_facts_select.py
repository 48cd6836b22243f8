"""bench/facts_select.py: paired model selection on train-split rows shaped like the held-out suites.

The probe must read the train split only, score exactly the answer bytes (its exact match agreeing with the
evaluation's own), report each row's answer NLL as a plain per-position loop would, and pair models row by row."""
from __future__ import annotations

import json
import math

import pytest
import torch

from superlinear_lab import data as D
from superlinear_lab.evaluate import run_examples
from superlinear_lab.loaders import open_model

from helpers import load_bench

P = load_bench("facts_select")
SUITES = ("fact_word", "fact_name")


@pytest.fixture(scope="module")
def report(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("select") / "select.json"
    assert P.main(["--models", "tiny", "small", "--lengths", "512", "--rows", "3", "--suites", *SUITES,
                   "--corpus", str(out.parent / "no-corpus"), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_exact_match_agrees_with_the_evaluation_on_the_same_train_rows(report):
    """Exact match per model, suite and length equals superlinear_lab.evaluate's on the same rows (seeds 900000+)."""
    assert report["split"] == "train" and report["seed_base"] == 900_000
    for name in ("tiny", "small"):
        model = open_model(name, backend="torch")
        for suite in SUITES:
            rows = [D.make_example(suite, 512, 900_000 + s, "train") for s in range(3)]
            expected = sum(r["correct"] for r in run_examples(model, rows)) / 3
            assert report["cells"][suite]["512"]["models"][name]["exact"] == pytest.approx(expected)
    # the two models differ here (tiny cannot answer word facts), so the comparison is not vacuous
    word = report["cells"]["fact_word"]["512"]
    assert word["models"]["tiny"]["exact"] != word["models"]["small"]["exact"]


def test_row_nll_is_the_mean_answer_byte_loss(one_thread):
    """A plain loop over the answer bytes: -log softmax(logits at the byte before)[byte], averaged."""
    model = open_model("small", backend="torch")
    ex = D.make_example("fact_phrase", 512, 900_001, "train")
    with torch.no_grad():
        logits = model(torch.tensor([ex.ids]))[0].double()
    a0, a1 = ex.answer
    losses = []
    for p in range(a0, a1):
        row = logits[p - 1]
        log_z = math.log(sum(math.exp(v - row.max().item()) for v in row.tolist())) + row.max().item()
        losses.append(log_z - row[ex.ids[p]].item())
    got = P.score_rows(model, [ex])[0]
    assert got["nll"] == pytest.approx(sum(losses) / len(losses), rel=1e-4, abs=1e-5)
    assert got["first_nll"] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)


def test_prompt_bytes_are_not_scored():
    """Quiz rows hold questions inside the answer range: those bytes are left out of the scored positions."""
    ex = D.make_example("fact_quiz", 1024, 900_000, "train")
    assert ex.prompts, "a quiz row asks its later questions inside the answer"
    pos = P.answer_positions(ex)
    prompt = {p for b0, b1 in ex.prompts for p in range(b0, b1)}
    assert pos and not prompt & set(pos)
    assert len(pos) + len(prompt) == ex.answer[1] - ex.answer[0]


def test_paired_counts():
    a = [{"nll": 1.0, "exact": False}, {"nll": 2.0, "exact": True}, {"nll": 1.0, "exact": True}]
    b = [{"nll": 0.5, "exact": True}, {"nll": 3.0, "exact": True}, {"nll": 1.0, "exact": False}]
    assert P.paired(a, b) == {"nll_diff": pytest.approx(0.5 / 3), "b_lower_nll": 1, "a_lower_nll": 1,
                              "only_b_exact": 1, "only_a_exact": 1}
    assert P.paired(a, a) == {"nll_diff": 0.0, "b_lower_nll": 0, "a_lower_nll": 0, "only_b_exact": 0,
                              "only_a_exact": 0}


def test_reads_the_train_split_only(monkeypatch, tmp_path):
    seen = []
    make = D.make_example

    def spy(task, length, seed, split="train", depth=None):
        seen.append((split, seed))
        return make(task, length, seed, split, depth)

    monkeypatch.setattr(D, "make_example", spy)
    model = open_model("tiny", backend="torch")
    P.run({"a": model, "b": model}, ["fact_name", "niah"], [256], rows=2)
    assert seen and all(split == "train" and seed >= 900_000 for split, seed in seen)


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        P.main(["--models", "tiny", "tiny", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        P.main(["--models", "tiny", "--rows", "0", "--out", str(tmp_path / "x.json")])
