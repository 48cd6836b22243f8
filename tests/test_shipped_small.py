"""The shipped prose-fact model `small` (package data, superlinear_lab/models/small), on CPU.

It must answer word-valued facts in prose it never saw, through its routing: held-out rows of
`superlinear_lab.data`'s eval split (``fact_word``: a statement like 'Keep this in mind: the baker uses "heron" as
the password.' in held-out Python reference topics, held-out phrasings and held-out words, with distractor facts of
the same kind, asked 'Tell me the password that the baker uses.'). `tiny`, which learned to find digits, answers
none of them and routes to them at chance level; so a wrong or missing model, or a routing regression, fails here.
Also: the card names the shipped files, holds the table of its own evaluation JSON and lists every target that
table shows not met, and a missing weight file raises instead of giving random weights.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from superlinear_lab import RoutingTrace, Session, load_model
from superlinear_lab import data as D
from superlinear_lab import facts as F
from superlinear_lab.evaluate import run_examples, summarize
from superlinear_lab.model import describe_model, io

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "superlinear_lab" / "models" / "small"
LENGTH, ROWS = 2048, 16  # 16 held-out rows of 2,048 tokens: ~10 s on one CPU thread
MIN_ANSWERED = 2  # rows answered exactly with the evidence reached (session 7's weights: 7 of 16; tiny: 0)
RECALL_OVER_CHANCE = 0.10  # routing recall must beat the chance baseline by this much (tiny: 0.70 vs 0.77)


@pytest.fixture(scope="module")
def model():
    return load_model("small", backend="torch")


@pytest.fixture(scope="module")
def rows():
    D.use_corpus(None)  # the default text, present on every install: its eval split is held-out Python topics
    return [D.make_example("fact_word", LENGTH, seed, "eval") for seed in range(ROWS)]


@pytest.fixture(scope="module")
def results(model, rows):
    return run_examples(model, rows, batch_size=4)


def _facts_table():
    spec = importlib.util.spec_from_file_location("bench_facts_table", ROOT / "bench" / "facts_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_loads_the_shipped_files_named_in_its_card(model):
    assert model.source["kind"] == "shipped" and model.source["name"] == "small"
    assert Path(model.source["path"]).resolve() == MODEL_DIR.resolve()
    digest = model.source["weights_sha256"]
    assert describe_model(model) == f"superlinear-lab/small (shipped, weights sha256 {digest[:12]})"
    assert model.cfg.to_dict() == json.loads((MODEL_DIR / "config.json").read_text())
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    for name, digest in model.source["files"].items():
        assert f"`{name}` {digest}" in card, f"MODEL_CARD.md does not list {name}'s sha256 {digest}"
    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 50_000_000, f"{weights}: {weights.stat().st_size:,} bytes, over 50 MB"
    with safe_open(str(weights), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {"F16", "BF16"}, f"{weights}: tensors in {dtypes}, expected a compact dtype"


def test_card_holds_the_table_of_its_evaluation():
    report = json.loads((MODEL_DIR / "eval" / "facts_eval.json").read_text())
    table = _facts_table().card_table(report, next(iter(report["suites"])))
    assert table in (MODEL_DIR / "MODEL_CARD.md").read_text(), \
        "MODEL_CARD.md's table differs from bench/facts_table.py --card of eval/facts_eval.json"


def test_card_lists_every_target_its_table_does_not_meet():
    """Issue 13: the card states every target not reached. Each suite the table marks "not met" has its line in
    "Known failures", and each target suite the evaluation lacks is named as not measured."""
    ft = _facts_table()
    report = json.loads((MODEL_DIR / "eval" / "facts_eval.json").read_text())
    model_key = next(iter(report["suites"]))
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    failures = card.split("## Known failures", 1)[1]
    for line in ft.card_table(report, model_key).splitlines()[2:]:
        label, status = line.split(" | ")[0].removeprefix("| "), line.rsplit(" | ", 1)[1].removesuffix(" |")
        if status == "**not met**":
            assert f"* **{label}: not met**" in failures, f"the card does not list {label!r} as not met"
    for task, (label, target) in ft.CARD_SUITES.items():
        if target is not None and task not in report["suites"][model_key]:
            assert f"* **{label}: not measured**" in failures, f"the card does not say {label!r} is not measured"


def test_rows_are_held_out(rows):
    held_out = set(F.vocabulary("words.txt", "eval"))
    for ex in rows:
        assert ex.meta["value"] in held_out and ex.meta["value"] not in F.vocabulary("words.txt", "train")
        (start, end), = ex.evidence
        statement = bytes(ex.ids[max(1, start - 120):end + 40]).decode("utf-8", errors="replace")
        assert any(t.split("{")[0] in statement for t in F.STATEMENTS["eval"]["word"]), statement


def test_answers_word_facts_in_held_out_prose_with_the_evidence_reached(model, rows, results):
    window = model.cfg.span.window_len
    answered = []
    for ex, r in zip(rows, results):
        (start, end), = ex.evidence
        assert all(q - end >= window for q in ex.queries), "the statement must lie outside the window"
        if r["correct"] and all(r["hit_any"]):
            answered.append(ex.meta["value"])
    s = summarize(results, [i for i, _ in model.routing_layers()])
    detail = (f"answered {answered} ({len(answered)} of {ROWS}); recall {s['recall_any']:.3f} against chance "
              f"{s['chance_any']:.3f}; byte accuracy {s['byte_accuracy']:.2f}")
    assert len(answered) >= MIN_ANSWERED, detail
    assert s["recall_any"] >= s["chance_any"] + RECALL_OVER_CHANCE, detail


def test_greedy_session_answers_and_the_trace_shows_the_evidence_reached(model, rows, results):
    ex = next((ex for ex, r in zip(rows, results) if r["correct"]), None)
    assert ex is not None, "no held-out row answered"
    a0, a1 = ex.answer
    session = Session(model, max_len=ex.length + 8, progress=False)
    session.append(ex.ids[:a0], role=None)
    assert session.generate_text(a1 - a0, temperature=0.0) == ex.meta["value"]

    (start, end), = ex.evidence
    with torch.no_grad(), RoutingTrace.capture(model, queries=ex.queries) as trace:
        model(torch.tensor([ex.ids]))
    for q in ex.queries:
        assert not trace.in_window(trace.layers[0], q, start)
        by = [(layer, h) for layer in trace.layers for h in range(model.cfg.n_heads)
              if all(trace.reached(layer, h, q, key) for key in range(start, end))]
        assert by, f"query {q}: no (layer, head) reached the value {ex.meta['value']!r} at {start}..{end - 1}"


def test_missing_files_raise_instead_of_random_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(io.MODELS_ENV, raising=False)
    monkeypatch.setattr(io, "shipped_models_dir", lambda: tmp_path)  # an install without the weight file
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_text((MODEL_DIR / "config.json").read_text())
    expected = r"model 'small': its weight files .*reinstall superlinear-lab.*load_model\(config="
    with pytest.raises(FileNotFoundError, match=expected):
        load_model("small")
