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


# --------------------------------------------------------------------------- rival pull (session 11's name loss)
ANSWER, RIVAL_B, RIVAL_C = 65, 66, 67  # first bytes: the answer's "A", rivals "B…" and "C…"


def _rival_row() -> D.Example:
    """A hand-built row: the answer "A.." at 15-18, its statement's value at 3-6 (evidence, also listed among the
    rivals, as a quiz lists every value), rivals "B.." twice, a rival "A.." (the answer's first byte), a rival "C..",
    and an empty range."""
    ids = [1] + [32] * 19
    for start, first in ((3, ANSWER), (6, RIVAL_B), (8, RIVAL_B), (10, ANSWER), (12, RIVAL_C), (15, ANSWER)):
        ids[start] = first
    return D.Example(ids=ids, answer=(15, 18), evidence=[(3, 6)], needs={14: [0], 15: [0], 16: [0]},
                     task="fact_name", rivals=[(3, 6), (6, 8), (8, 10), (10, 12), (12, 14), (14, 14)])


def _probs(mass: dict[int, float], vocab: int = 264) -> torch.Tensor:
    rest = (1 - sum(mass.values())) / (vocab - len(mass))
    p = torch.full((vocab,), rest, dtype=torch.float64)
    for t, v in mass.items():
        p[t] = v
    return p


def test_rival_pull_sums_distinct_rival_first_bytes_never_the_answers():
    """B (two rivals) once, C once; never A: the answer's own byte, whether it comes from the evidence listed as a
    rival or from a rival that starts like the answer."""
    mass, n = P.rival_pull(_probs({ANSWER: 0.5, RIVAL_B: 0.2, RIVAL_C: 0.1}), _rival_row())
    assert n == 2 and mass == pytest.approx(0.3)
    mass, n = P.rival_pull(_probs({ANSWER: 0.97}), _rival_row())  # all mass on the answer: no pull
    assert mass == pytest.approx(2 * 0.03 / 263)  # B and C hold the uniform rest


class _PositionModel:
    """Logits that differ by position: the answer's query (14) puts 0.2 on B and 0.1 on C, the answer's first
    byte's own position (15) 0.6 on B, the position before (13) 0.7 on C."""
    device = torch.device("cpu")

    def __call__(self, ids):
        rows = [_probs({RIVAL_B: 0.01})] * ids.shape[1]
        rows[13] = _probs({RIVAL_C: 0.7})
        rows[14] = _probs({ANSWER: 0.5, RIVAL_B: 0.2, RIVAL_C: 0.1})
        rows[15] = _probs({RIVAL_B: 0.6})
        return torch.stack(rows).log().float()[None].expand(ids.shape[0], -1, -1)


def test_rival_pull_reads_the_query_before_the_answer():
    got = P.score_rows(_PositionModel(), [_rival_row(), _rival_row()], rival=True)
    assert [g["rival_bytes"] for g in got] == [2, 2]
    assert [g["rival_pull"] for g in got] == [pytest.approx(0.3, abs=1e-5)] * 2
    assert "rival_pull" not in P.score_rows(_PositionModel(), [_rival_row()])[0]  # only when asked


def test_rival_pull_cell_mean_counts_rows_without_rivals():
    rows = [{"nll": 1.0, "first_nll": 1.0, "exact": True, "rival_pull": 0.3, "rival_bytes": 2},
            {"nll": 1.0, "first_nll": 1.0, "exact": True, "rival_pull": 0.0, "rival_bytes": 0}]
    s = P.summary(rows)
    assert s["rival_pull"] == pytest.approx(0.15) and s["rival_rows"] == 1
    assert "rival_pull" not in P.summary([{k: v for k, v in r.items() if not k.startswith("rival")} for r in rows])


def test_rival_pull_on_real_name_rows(one_thread):
    """Train-split fact_name rows: rival bytes are first bytes of the row's other names, never the answer's; the
    report carries the mean per model; a cell is written as soon as it is done."""
    rows = [D.make_example("fact_name", 512, 900_000 + s, "train") for s in range(6)]
    assert any(ex.rivals for ex in rows)
    for ex in rows:
        probs = torch.zeros(264, dtype=torch.float64)
        probs[ex.ids[ex.answer[0]]] = 1.0
        assert P.rival_pull(probs, ex)[0] == 0.0
        probs = torch.ones(264, dtype=torch.float64)
        assert P.rival_pull(probs, ex)[1] == len({ex.ids[a] for a, _ in ex.rivals} - {ex.ids[ex.answer[0]]})
    seen = []
    model = open_model("small", backend="torch")
    out = P.run({"small": model}, ["fact_name"], [512], rows=2, rival=True, on_cell=lambda c: seen.append(c))
    cell = out["cells"]["fact_name"]["512"]["models"]["small"]
    assert 0.0 <= cell["rival_pull"] <= 1.0 and seen and "512" in seen[0]["fact_name"]
