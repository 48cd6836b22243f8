"""The shipped model (package data, superlinear_lab/models/tiny): `load_model()` finds it, it answers a held-out
NIAH case, and the evidence was reached by routing — so a broken loader or a routing regression fails here, on CPU.
Without its files `load_model` raises; random weights come only when asked for."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from superlinear_lab import RoutingTrace, Session, load_model
from superlinear_lab import data as D
from superlinear_lab.model import describe_model, io

MODEL_DIR = Path(__file__).resolve().parents[1] / "superlinear_lab" / "models" / "tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(backend="torch")  # the default: name "tiny", CPU, float32


@pytest.fixture(scope="module")
def case():
    # Held-out seed, needle far behind the question: only a chosen span can reach it.
    return D.niah(1536, 0.3, seed=7, split="eval")


def test_default_load_is_the_shipped_model(model):
    assert model.source["kind"] == "shipped" and model.source["name"] == "tiny"
    assert Path(model.source["path"]).resolve() == MODEL_DIR.resolve()
    assert model.source["weights_sha256"] == io.sha256_file(MODEL_DIR / "model.safetensors")
    assert model.model_id == "superlinear-lab/tiny"
    assert describe_model(model) == f"superlinear-lab/tiny (shipped, weights sha256 {model.source['weights_sha256'][:12]})"
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    for name, digest in model.source["files"].items():  # the card names exactly the weights that ship
        assert f"`{name}` {digest}" in card, f"MODEL_CARD.md does not list {name}'s sha256 {digest}"
    shipped = json.loads((MODEL_DIR / "config.json").read_text())
    assert model.cfg.to_dict() == shipped
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_answers_niah_and_routes_to_the_needle(model, case):
    ids = torch.tensor([case.ids])
    with torch.no_grad(), RoutingTrace.capture(model, queries=case.queries) as trace:
        logits = model(ids)
    a0, a1 = case.answer
    assert model.tokenizer.decode(logits[0, a0 - 1:a1 - 1].argmax(-1).tolist()) == case.answer_text()

    start, end = case.evidence[0]
    heads = model.cfg.n_heads
    for q in case.queries:
        assert not trace.in_window(trace.layers[0], q, start), "the needle must lie outside the window"
        by = [(layer, h) for layer in trace.layers for h in range(heads)
              if all(trace.reached(layer, h, q, key) for key in range(start, end))]
        assert by, f"query {q}: no (layer, head) reached the evidence keys {start}..{end - 1}"


def test_greedy_session_generates_the_answer(model, case):
    a0, a1 = case.answer
    session = Session(model, max_len=case.length + 8, progress=False)
    session.append(case.ids[:a0], role=None)
    assert session.generate_text(a1 - a0, temperature=0.0) == case.answer_text()


def test_missing_files_raise_instead_of_random_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(io.MODELS_ENV, raising=False)
    monkeypatch.setattr(io, "shipped_models_dir", lambda: tmp_path)  # an install without the model files
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text((MODEL_DIR / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"model 'tiny': its weight files .* random_init=True"):
        load_model("tiny")
    with pytest.raises(ValueError, match="not a shipped model"):
        load_model("tiny-typo")
    random = load_model("tiny", random_init=True)  # explicit: fine, and it says so
    assert random.source["kind"] == "random-init" and "RANDOM WEIGHTS" in describe_model(random)
    with pytest.raises(ValueError, match="random_init and config given together"):
        load_model("tiny", random_init=True, config=random.cfg)
