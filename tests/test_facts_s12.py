"""Issue 13, session 12's preparation: the two arm configs, training from the committed fp16 export, compact
checkpoints that resume, and the fixed selection rule as code (bench/facts_s12/)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from superlinear_lab import train as T

from helpers import load_bench

ROOT = Path(__file__).resolve().parents[1]
FP16 = "bench/facts_s11/s11_final_fp16"
CK = load_bench("facts_s12/ckpt")
RULE = load_bench("facts_s12/rule")
DRY = load_bench("facts_s12/dryrun")


def _config(name: str) -> T.TrainConfig:
    return T.load_config(str(ROOT / "bench" / name))


def test_arm_configs_are_session_11s_mixes_with_the_stated_changes():
    """A: s11 `final`'s mix with fact_quiz back to 25 % and fact_name_keyed at 1 % (the 4 points from plain text and
    the phrase quiz), from s11's fp16 export; B: s11 `cont`'s mix from small. Both: seed 161, the rest unchanged."""
    a, b = _config("facts_s12_A.json"), _config("facts_s12_B.json")
    final, cont = _config("facts_s11_final.json"), _config("facts_s11_cont.json")
    for cfg in (a, b):
        assert sum(cfg.task_mix.values()) == pytest.approx(1.0, abs=1e-12)
        assert cfg.seed == 161 and cfg.corpus == "runs/corpus"
    assert a.task_mix["fact_quiz"] >= 0.25 and a.task_mix["fact_name_keyed"] <= 0.01
    changed = {k for k in final.task_mix if final.task_mix[k] != a.task_mix[k]}
    assert changed == {"fact_quiz", "fact_name_keyed", "text", "fact_phrase_quiz"}
    assert set(a.task_mix) == set(final.task_mix)
    assert a.init_from == FP16 and b.init_from == "small" and b.task_mix == cont.task_mix
    for new, old in ((a, final), (b, cont)):
        same = {k: v for k, v in dataclasses.asdict(new).items() if k not in ("task_mix", "seed", "init_from")}
        assert same == {k: v for k, v in dataclasses.asdict(old).items() if k in same}


@pytest.mark.parametrize("name", ["facts_s12_A.json", "facts_s12_B.json"])
def test_arm_configs_build_batches(name, tmp_path, one_thread):
    """The dry run (short rows here; the real stages on the device): start weights through train's architecture
    check, batches from train's own iterator, every task of the mix buildable."""
    cfg = _config(name)
    init = str(ROOT / cfg.init_from) if cfg.init_from != "small" else "small"
    cfg = dataclasses.replace(cfg, stages=[[1024, 1, 2], [2048, 1, 1]], corpus=None, init_from=init)
    path = tmp_path / name
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    res = DRY.check(str(path), steps=1)
    assert res["problems"] == ["MISSING None: Python docs used"]
    assert [b["length"] for b in res["batches"]] == [1024, 2048] and [b["step"] for b in res["batches"]] == [0, 1]
    assert all(set(b["tasks"]) <= set(cfg.task_mix) for b in res["batches"])


def _tiny_run(init_from=FP16, lr=0.0, steps=1) -> T.TrainConfig:
    return dataclasses.replace(_config("facts_s12_A.json"), stages=[[256, steps, 1]], task_mix={"fact_name": 1.0},
                               probe_every=0, init_from=str(ROOT / init_from), lr=lr, weight_decay=0.0, warmup=1,
                               corpus=None)


def test_training_starts_from_the_fp16_export(tmp_path, one_thread):
    """train.train (facts_gpu.py's path) on s11's fp16 export: at lr 0 the trained weights are the export upcast."""
    T.train(_tiny_run(), tmp_path / "ck", backend="torch", progress=False)
    trained = load_file(str(tmp_path / "ck" / "model.safetensors"))
    export = load_file(str(ROOT / FP16 / "model.safetensors"))
    assert {v.dtype for v in export.values()} == {torch.float16}
    assert set(trained) == set(export) and all(torch.equal(trained[k], export[k].float()) for k in export)


def test_compact_checkpoint_resumes(tmp_path, one_thread):
    """pack -> unpack gives the weights, state and log exactly, the second moment to bf16 and the first at zero;
    train.train resumes from it with the unpacked train_config.json and reaches the step a straight run reaches,
    its weights within one update of it; without the moments file it resumes too (zero moments)."""
    cfg = _tiny_run(lr=1e-4, steps=3)
    straight = tmp_path / "straight"
    T.train(cfg, straight, backend="torch", progress=False, max_steps=2)
    first = tmp_path / "first"
    T.train(cfg, first, backend="torch", progress=False, max_steps=2)
    files = CK.pack(first, tmp_path / "ck_A")
    assert [f.name for f in files] == ["ck_A_model.safetensors", "ck_A_moments.safetensors"]
    got = CK.unpack(tmp_path / "ck_A", tmp_path / "resumed")
    assert got == {"step": 2, "moments": "second, bf16"}
    assert files[0].stat().st_size > 1.9 * files[1].stat().st_size  # fp32 weights, one bf16 moment
    for name in ("model.safetensors",):
        a, b = load_file(str(first / name)), load_file(str(tmp_path / "resumed" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(d / "optimizer_exp_avg_sq.safetensors")) for d in (first, tmp_path / "resumed"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-2, atol=1e-12) for k in a)
    a, b = (load_file(str(d / "optimizer_exp_avg.safetensors")) for d in (first, tmp_path / "resumed"))
    assert set(a) == set(b) and all(not b[k].any() for k in b) and any(a[k].any() for k in a)
    assert (first / "state.json").read_text() == (tmp_path / "resumed" / "state.json").read_text()
    assert (first / "log.jsonl").read_text() == (tmp_path / "resumed" / "log.jsonl").read_text()
    resumed_cfg = T.load_config(str(tmp_path / "resumed" / "train_config.json"))
    assert resumed_cfg == cfg
    state = T.train(resumed_cfg, tmp_path / "resumed", backend="torch", progress=False)
    T.train(cfg, straight, backend="torch", progress=False)
    assert state["step"] == 3
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    start = load_file(str(first / "model.safetensors"))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert 0 < max(float((a[k] - b[k]).abs().max()) for k in a) <= moved  # within the one update both made
    (tmp_path / "ck_A_moments.safetensors").unlink()
    assert CK.unpack(tmp_path / "ck_A", tmp_path / "zero") == {"step": 2, "moments": "zero"}
    assert T.train(resumed_cfg, tmp_path / "zero", backend="torch", progress=False)["step"] == 3


# --------------------------------------------------------------------------- the selection rule
A, B = "runs/s12/A", "runs/s12/B"


def _report(exact_a: list[int], exact_b: list[int], pull=(0.01, 0.01), nll=(0.3, 0.3), rows=64) -> dict:
    """facts_select-shaped cells: the 7 suites at 64K with these exact rows, fact_name at 8K with these pulls."""
    cells: dict = {}
    for suite, ea, eb in zip(RULE.SELECT_SUITES, exact_a, exact_b):
        cells.setdefault(suite, {})["65536"] = {"models": {
            A: {"rows": rows, "exact": ea / rows, "nll": nll[0]}, B: {"rows": rows, "exact": eb / rows, "nll": nll[1]}}}
    cells.setdefault("fact_name", {})["8192"] = {"models": {
        A: {"rows": rows, "exact": 1.0, "nll": 0.1, "rival_pull": pull[0]},
        B: {"rows": rows, "exact": 1.0, "nll": 0.1, "rival_pull": pull[1]}}}
    return {"cells": cells}


def test_pick_by_exact_rows_then_rival_pull_then_nll():
    base = [50] * 7
    assert RULE.pick([_report([55] + [50] * 6, base)], A, B)["pick"] == "A"  # +5 of 448 > 1 %
    assert RULE.pick([_report(base, [55] + [50] * 6)], A, B)["pick"] == "B"
    at = RULE.pick([_report([57] + [50] * 6, base, pull=(0.02, 0.04), rows=100)], A, B)  # +7 of 700: 1 %, a tie
    assert at["pick"] == "A" and at["why"].startswith("exact tie")
    assert RULE.pick([_report([58] + [50] * 6, base, pull=(0.03, 0.02), rows=100)], A, B)["pick"] == "A"  # +8
    tie = RULE.pick([_report([54] + [50] * 6, base, pull=(0.05, 0.03))], A, B)  # +4 of 448: a tie
    assert tie["pick"] == "B" and "rival pull" in tie["why"] and tie["exact"] == {"A": 354, "B": 350}
    assert RULE.pick([_report(base, base, pull=(0.020, 0.031), nll=(0.3, 0.2))], A, B)["pick"] == "A"  # pull
    assert RULE.pick([_report(base, base, pull=(0.020, 0.025), nll=(0.3, 0.2))], A, B)["pick"] == "B"  # NLL
    assert RULE.pick([_report(base, base, pull=(0.025, 0.020), nll=(0.2, 0.3))], A, B)["pick"] == "A"


def test_rival_pull_vetoes_a_small_exact_lead():
    """Session 11's case: the arm ahead by a few exact rows with ~9x the other's rival pull is not picked; a lead of
    5 % of the rows or more stands; a pull neither twice the other's nor 0.02 above it vetoes nothing."""
    base = [50] * 7
    v = RULE.pick([_report([60] + [50] * 6, base, pull=(0.063, 0.007))], A, B)  # +10 of 448 = 2.2 %
    assert v["pick"] == "B" and v["vetoed"] == "A" and "VETO" in v["why"]
    assert RULE.pick([_report([73] + [50] * 6, base, pull=(0.063, 0.007))], A, B)["pick"] == "A"  # +23 = 5.1 %
    assert RULE.pick([_report([60] + [50] * 6, base, pull=(0.030, 0.016))], A, B)["pick"] == "A"  # < 2x
    assert RULE.pick([_report([60] + [50] * 6, base, pull=(0.015, 0.002))], A, B)["pick"] == "A"  # < +0.02
    assert RULE.pick([_report(base, [60] + [50] * 6, pull=(0.007, 0.063))], A, B)["pick"] == "A"


def test_pick_needs_enough_cells_and_paired_rows():
    rep = _report([64] * 7, [0] * 7)
    for suite in RULE.SELECT_SUITES[:4]:
        del rep["cells"][suite]["65536"]
    res = RULE.pick([rep], A, B)
    assert res["pick"] == "B" and "3 of 7" in res["why"]  # the control arm
    del rep["cells"]["fact_name"]  # no rival cell: no veto, no tie-break by pull
    assert "rival_pull" not in RULE.pick([rep], A, B)
    tie = _report([50] * 7, [50] * 7, nll=(0.2, 0.3))
    del tie["cells"]["fact_name"]["8192"]
    assert RULE.pick([tie], A, B)["pick"] == "A" and "missing" in RULE.pick([tie], A, B)["why"]
    bad = _report([50] * 7, [50] * 7)
    bad["cells"]["niah"]["65536"]["models"][B]["rows"] = 32
    with pytest.raises(ValueError, match="different numbers of rows"):
        RULE.pick([bad], A, B)
    other = _report([51] + [50] * 6, [50] * 7)
    with pytest.raises(ValueError, match="twice"):
        RULE.pick([_report([50] * 7, [50] * 7), other], A, B)


def test_pick_reads_partial_files_and_skips_cut_ones(tmp_path, capsys):
    (tmp_path / "sel_word.json").write_text(json.dumps({**_report([60] + [50] * 6, [50] * 7), "partial": True}))
    (tmp_path / "sel_cut.json").write_text('{"cells": {"fact_na')
    assert RULE.main(["pick", str(tmp_path / "sel_word.json"), str(tmp_path / "sel_cut.json"), "--a", A, "--b", B,
                      "--out", str(tmp_path / "pick.json")]) == 0
    assert capsys.readouterr().out.strip() == "A"
    assert json.loads((tmp_path / "pick.json").read_text())["exact"] == {"A": 360, "B": 350}


def test_missing_cells():
    rep = {"suites": {"small": {s: {n: {"accuracy": 1.0} for n in RULE.EVAL_LENGTHS} for s in RULE.EVAL_SUITES},
                      A: {"fact_word": {"8192": {"accuracy": 1.0}}}}}
    got = RULE.missing([rep], [A, "small"])
    assert len(got) == 31 and (A, "fact_word", "8192") not in got and all(m == A for m, _, _ in got)
    assert RULE.missing([rep], ["small"]) == []


# --------------------------------------------------------------------------- session 14: the hop gate
def _hop_rows(model: str, exact: int, first: int, n: int = 24) -> list[dict]:
    """facts_hop_diagnose-shaped train rows: the first `exact` answered, the first `first` first hops right."""
    return [{"model": model, "split": "train", "seed": 900_000 + i, "correct": i < exact,
             "first_hop": {"correct": i < first}} for i in range(n)]


def test_hop_gate_needs_the_first_hop_kept_and_three_more_hops():
    base = _hop_rows("small", exact=5, first=24)
    assert RULE.hop_gate(_hop_rows("hop", 8, 23) + base, "hop", "small")["passed"]  # +3 exact, first -1
    g = RULE.hop_gate(_hop_rows("hop", 8, 22) + base, "hop", "small")  # first -2: session 13's H lost it
    assert not g["passed"] and g["g2_exact"] and not g["g1_first_hop"]
    g = RULE.hop_gate(_hop_rows("hop", 7, 24) + base, "hop", "small")  # +2 exact only
    assert not g["passed"] and g["g1_first_hop"] and g["counts"]["hop"] == {"rows": 24, "exact": 7, "first_hop": 24}
    with pytest.raises(ValueError, match="same train rows"):
        RULE.hop_gate(_hop_rows("hop", 8, 24, n=12) + base, "hop", "small")
    eval_rows = [{**r, "split": "eval"} for r in _hop_rows("hop", 24, 24)]  # held-out rows never count
    with pytest.raises(ValueError, match="same train rows"):
        RULE.hop_gate(eval_rows + base, "hop", "small")


def test_a_passed_hop_gate_picks_the_hop_arm_unless_it_is_more_than_2_percent_behind():
    base, passed, failed = [50] * 7, {"passed": True}, {"passed": False}
    behind8 = _report([42] + [50] * 6, base)  # -8 of 448 (2 % = 8.96): picked for its hop
    res = RULE.pick_with_gate([behind8], A, B, passed)
    assert res["pick"] == "A" and res["hop_gate"] and "hop gate passed" in res["why"]
    assert RULE.pick_with_gate([behind8], A, B, failed)["pick"] == "B"  # session 12's steps: B leads by 8 > 1 %
    assert RULE.pick_with_gate([_report([41] + [50] * 6, base)], A, B, passed)["pick"] == "B"  # -9 > 2 %
    few = _report([50] * 7, [40] * 7)
    for suite in RULE.SELECT_SUITES[:4]:
        del few["cells"][suite]["65536"]
    assert RULE.pick_with_gate([few], A, B, passed)["pick"] == "B"  # too few cells: the control, gate or not


def test_hop_gate_command(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in _hop_rows("hop", 9, 24) + _hop_rows("small", 5, 24)))
    assert RULE.main(["hop-gate", str(rows), "--cand", "hop", "--base", "small", "--out", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["passed"] is True
    (tmp_path / "sel.json").write_text(json.dumps(_report([45] + [50] * 6, [50] * 7)))
    capsys.readouterr()
    assert RULE.main(["pick", str(tmp_path / "sel.json"), "--a", A, "--b", B, "--hop-gate", str(tmp_path / "g.json")]) == 0
    assert capsys.readouterr().out.strip() == "A"
