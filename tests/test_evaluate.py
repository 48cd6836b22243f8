"""Evaluation pieces: routing recall from chosen spans, answer checking, summaries, the figure and the CLI."""
from __future__ import annotations

import json

import torch

from superlinear_kernels import SearchResult, SpanConfig
from superlinear_lab import data as D
from superlinear_lab import evaluate as E
from superlinear_lab.model import HybridLM, ModelConfig, save_model


def _routing(spans):
    """SearchResult [1, H=2, L=50, K=2] with given {(head, query): [(qstart, qend), ...]}; all else invalid."""
    qs = torch.full((1, 2, 50, 2), -1, dtype=torch.int32)
    qe = qs.clone()
    for (h, q), pairs in spans.items():
        for k, (a, b) in enumerate(pairs):
            qs[0, h, q, k], qe[0, h, q, k] = a, b
    values = torch.where(qs >= 0, torch.zeros(qs.shape), torch.full(qs.shape, float("-inf")))
    return SearchResult(qs, qe.clone(), qe, values)


def _naive_whole_in_one_branch(spans, window_len, query, start, end):
    """Reference: enumerate keys; branch k = span k ∪ window [max(q-W+1, 0), q]; end exclusive."""
    window = set(range(max(query - window_len + 1, 0), query + 1)) if window_len else set()
    need = set(range(start, end))
    branches = [set(range(a, b + 1)) | window for a, b in spans] or [window]
    return any(need <= b for b in branches)


def test_reached_needs_the_whole_range_in_one_branch():
    spans = {(0, 40): [(10, 20), (0, 5)], (1, 40): [(15, 25), (0, 14)]}
    r = _routing(spans)
    row = torch.tensor([0, 0, 0, 0])
    query = torch.tensor([40, 40, 40, 40])
    start, end = torch.tensor([12, 18, 30, 23]), torch.tensor([18, 22, 33, 29])  # end exclusive
    cfg = SpanConfig.default()  # W = 15 for sw_index 3, 8 for 2, 0 for 0
    hit = E.reached(r, cfg.replace(sw_index=2), row=row, query=query, ev_start=start, ev_end=end)
    assert hit.tolist() == [[True, False],  # [12, 17] inside head 0's (10, 20); head 1 splits it over two spans
                            [False, True],  # [18, 21] inside head 1's (15, 25) only
                            [False, False],  # [30, 32]: no span, window is [33, 40]
                            [False, False]]
    wide = E.reached(r, cfg, row, query, start, end)  # window [26, 40]
    assert wide[2].tolist() == [True, True]
    assert wide[3].tolist() == [False, True]  # [23, 28]: head 1's span (15, 25) together with the window
    for sw in (0, 2, 3, 4):  # against the naive key enumeration, many ranges
        w = cfg.replace(sw_index=sw).window_len
        ranges = [(a, b) for a in range(0, 40, 3) for b in range(a + 1, 41, 4)]
        n = len(ranges)
        got = E.reached(r, cfg.replace(sw_index=sw), torch.zeros(n, dtype=torch.long), torch.full((n,), 40),
                        torch.tensor([a for a, _ in ranges]), torch.tensor([b for _, b in ranges]))
        for p, (a, b) in enumerate(ranges):
            for h in range(2):
                assert bool(got[p, h]) == _naive_whole_in_one_branch(spans[(h, 40)], w, 40, a, b), (w, a, b, h)


def test_summary_counts_pairs_and_heads():
    results = [{"task": "niah", "length": 10, "meta": {}, "correct": True, "pairs": 2, "hit_any": [True, True],
                "hit": [[2, 1], [0, 0]], "chance_head": [0.5, 0.25], "chance_any": [0.9, 0.5]},
               {"task": "niah", "length": 10, "meta": {}, "correct": False, "pairs": 2, "hit_any": [True, False],
                "hit": [[1, 0], [0, 1]], "chance_head": [0.25, 0.0], "chance_any": [0.6, 0.0]}]
    s = E.summarize(results, [1, 3])
    assert s["chance_head"] == 0.25 and s["chance_any"] == 0.5  # averaged over the 4 pairs
    assert s["accuracy"] == 0.5 and s["recall_any"] == 0.75 and s["routed_examples"] == 0.5
    assert s["per_head"] == {"layers.1": [0.75, 0.25], "layers.3": [0.0, 0.25]}
    assert s["best_head"] == {"recall": 0.75, "layer": 1, "head": 0}


def test_cli_on_a_tiny_random_model(tmp_path):
    cfg = ModelConfig(pattern="M*", d_model=32, d_ff=64, n_heads=2, n_kv_heads=1, head_dim=16, ssm_head_dim=16)
    save_model(HybridLM(cfg), tmp_path / "m")
    assert E.main(["--model", str(tmp_path / "m"), "--lengths", "300", "--depths", "0", "1", "--seeds", "2",
                   "--suite-seeds", "1", "--suites", "multi_hop", "--out", str(tmp_path / "out"),
                   "--backend", "torch", "--batch-size", "2"]) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [c["depth"] for c in report["niah"]["cells"]] == [0.0, 1.0]
    assert report["niah"]["by_length"]["300"]["n"] == 4 and report["niah"]["by_length"]["300"]["pairs"] == 20
    assert "300" in report["multi_hop"]["by_length"] and report["setup"]["backend"] == "torch"
    assert report["setup"]["weights"].startswith("superlinear-lab/")  # names the model and its weights
    assert (tmp_path / "out" / "niah_heatmap.html").stat().st_size > 10_000
    assert "| 300 |" in E.format_table(report)


def test_answer_correct_is_greedy_exact_match():
    ex = D.niah(300, 0.5, 0, "eval")
    logits = torch.full((1, 300, 264), -1.0)
    a0, a1 = ex.answer
    for q in range(a0 - 1, a1 - 1):
        logits[0, q, ex.ids[q + 1]] = 1.0
    assert E.answer_correct(logits, [ex]) == [True]
    logits[0, a1 - 2, ex.ids[a1 - 1]] = -2.0
    assert E.answer_correct(logits, [ex]) == [False]
    assert E.answer_hits(logits, [ex]) == [[True] * (a1 - a0 - 1) + [False]]  # only the last byte is wrong


def test_byte_and_first_byte_accuracy_in_summaries():
    """Two examples of 5 answer bytes: one right but its first byte, one right in bytes 0 and 3 only."""
    exs = [D.niah(300, 0.5, s, "eval") for s in range(2)]
    logits = torch.zeros(2, 300, 264)
    for b, ex in enumerate(exs):
        a0, a1 = ex.answer
        for j, q in enumerate(range(a0 - 1, a1 - 1)):
            right = j != 0 if b == 0 else j in (0, 3)
            logits[b, q, ex.ids[q + 1] if right else (ex.ids[q + 1] + 1) % 256] = 5.0
    hits = E.answer_hits(logits, exs)
    assert hits == [[False, True, True, True, True], [True, False, False, True, False]]

    class Fixed(HybridLM):  # routes as a random model, answers with the logits above
        def forward(self, ids):
            super().forward(ids)
            return logits

    torch.manual_seed(0)
    model = Fixed(ModelConfig(d_model=32, d_ff=64, n_heads=2, n_kv_heads=1, head_dim=16, ssm_head_dim=16,
                              pattern="M*")).eval()
    results = E.run_examples(model, exs, batch_size=2)
    assert [(r["answer_bytes"], r["bytes_right"], r["first_byte"]) for r in results] == [(5, 4, False), (5, 2, True)]
    s = E.summarize(results, [1])
    assert s["byte_accuracy"] == 6 / 10 and s["first_byte_accuracy"] == 0.5 and s["accuracy"] == 0.0

def test_help_names_the_superlinear_lab_command(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        E.main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: superlinear-lab evaluate")
