"""Retrofit on a tiny Llama built from a config (CPU, seconds): only Q1 trains, an interrupted run resumes to the same
weights as an uninterrupted one, the written model loads back with the same logits, the module CLI works."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import superlinear_lab.hf as hf  # noqa: E402
from superlinear_kernels import SpanConfig  # noqa: E402
import importlib  # noqa: E402

rf = importlib.import_module("superlinear_lab.hf.distill")  # the module (hf.retrofit is the function)

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 264
CFG = SpanConfig.default()
SETTINGS = dict(steps=4, batch_size=2, seq_len=40, lr=1e-2, save_every=2, warmup=1)


def dense_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))


def test_only_q1_trains_and_the_model_reloads(tmp_path, stream):
    model = dense_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = rf.retrofit(model, CFG, stream, tmp_path / "run", settings=rf.RetrofitSettings(**SETTINGS),
                         progress=False)
    assert result.steps_done == 4 and len(result.history) == 4 and result.history[0]["kl"] > 0
    after = model.state_dict()
    q1 = rf.trainable_parameters(model)
    assert q1 and all(".q_proj.search." in name for name in q1)
    for name, value in before.items():  # every pretrained weight is untouched (q_proj now lives at q_proj.base)
        key = name.replace("q_proj.", "q_proj.base.")
        assert torch.equal(after[key], value), name
    assert any(not torch.equal(p, after[n.replace(".search.", ".base.")]) for n, p in q1.items())
    ids = stream[:60][None]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        loaded = hf.from_pretrained(tmp_path / "run" / "model")
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-6)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 4 and state["span_configs"]["0"] == CFG.to_dict()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, stream, monkeypatch):
    settings = rf.RetrofitSettings(**SETTINGS)
    full = dense_model()
    rf.retrofit(full, CFG, stream, tmp_path / "a", settings=settings, progress=False)

    real_save = rf._save_state

    def crash_after_first_save(out, step, *args):
        real_save(out, step, *args)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    part = dense_model()
    monkeypatch.setattr(rf, "_save_state", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        rf.retrofit(part, CFG, stream, tmp_path / "b", settings=settings, progress=False)
    monkeypatch.setattr(rf, "_save_state", real_save)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 2
    resumed = dense_model()
    result = rf.retrofit(resumed, CFG, stream, tmp_path / "b", settings=settings, progress=False)
    assert result.steps_done == 4
    want, got = rf.trainable_parameters(full), rf.trainable_parameters(resumed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    longer = rf.retrofit(resumed, CFG, stream, tmp_path / "b", settings=rf.RetrofitSettings(**{**SETTINGS,
                                                                                             "steps": 5}),
                         progress=False)  # a finished run continued to a larger total
    assert longer.steps_done == 5 and [h["step"] for h in longer.history] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="planned 5 steps"):
        rf.retrofit(dense_model(), CFG, stream, tmp_path / "b", settings=settings, progress=False)
    with pytest.raises(ValueError, match="different settings"):
        rf.retrofit(dense_model(), CFG, stream, tmp_path / "b",
                    settings=rf.RetrofitSettings(**{**SETTINGS, "steps": 5, "lr": 0.5}), progress=False)


def test_mse_loss_and_heldout_loss(stream):
    model = dense_model(seed=3)
    result = rf.retrofit(model, CFG, stream, None, settings=rf.RetrofitSettings(**{**SETTINGS, "loss": "kl+mse",
                                                                                  "steps": 1}), progress=False)
    assert result.history[0]["mse"] > 0
    rows = stream[:81]
    with torch.no_grad():
        logits = model(input_ids=rows[None, :-1]).logits[0]
    manual = float(F.cross_entropy(logits, rows[1:]))
    assert rf.heldout_loss(model, stream[:81], 80) == pytest.approx(manual, rel=1e-5)


def test_module_cli(tmp_path, stream, capsys):
    model = dense_model(seed=4)
    model.save_pretrained(str(tmp_path / "dense"))
    text = tmp_path / "doc.txt"
    text.write_text("Return the sum of a and b. Raises TypeError when an argument is not a number.\n" * 20)
    assert rf.build_parser().prog == "superlinear-lab retrofit"
    code = rf.main([str(tmp_path / "dense"), "--out", str(tmp_path / "run"), "--text", str(text), "--steps", "2",
                    "--seq-len", "32", "--batch-size", "2", "--device", "cpu"])
    assert code == 0 and (tmp_path / "run" / "model" / rf.SEARCH_FILE).exists()
    assert rf.main([str(tmp_path / "dense"), "--out", str(tmp_path / "x"), "--span", "{bad"]) == 2
    assert "--span" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seq_len"):
        rf.RetrofitSettings(seq_len=0)


def test_cli_keeps_the_models_tokenizer(tmp_path, capsys):
    """A model with its own tokenizer: retrofit reads the text with it and writes it beside the result, which opens
    (as serve/report open it) with that tokenizer; a model without one is a clear error."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from superlinear_lab.hf.open import load

    text = tmp_path / "doc.txt"
    text.write_text("Return the sum of a and b. Raises TypeError when an argument is not a number.\n" * 40)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text.read_text()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>")
    torch.manual_seed(5)
    config = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(tmp_path / "dense"))
    assert rf.main([str(tmp_path / "dense"), "--out", str(tmp_path / "x"), "--text", str(text), "--steps", "1"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    tok.save_pretrained(str(tmp_path / "dense"))
    assert rf.main([str(tmp_path / "dense"), "--out", str(tmp_path / "run"), "--text", str(text), "--steps", "2",
                    "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]) == 0
    opened = load(tmp_path / "run" / "model")
    assert isinstance(opened.tokenizer, hf.model.HFTokenizer)
    assert opened.tokenizer.encode("Return the sum") == tok.encode("Return the sum")


def test_train_attention_too_against_a_frozen_teacher(tmp_path, stream, monkeypatch):
    """train="attention": the converted layer's own projections train too, MLPs and dense layers do not, and the
    teacher is the original dense model (the first step's KL equals a Q1-only run's on the same batch)."""
    settings = dict(SETTINGS, steps=2, save_every=1)
    q1_only = rf.retrofit(dense_model(seed=5), {1: CFG}, stream, None, settings=rf.RetrofitSettings(**settings),
                          progress=False)
    model = dense_model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teachers = []
    real_dense = rf.dense
    monkeypatch.setattr(rf, "dense", lambda m: teachers.append(m) or real_dense(m))
    result = rf.retrofit(model, {1: CFG}, stream, tmp_path / "run",
                         settings=rf.RetrofitSettings(**settings, train="attention"), progress=False)
    assert len(teachers) == 2 and all(t is not model for t in teachers)  # never the moving student
    for name, p in teachers[0].named_parameters():  # the copy still holds the pretrained weights
        if ".search." not in name:
            torch.testing.assert_close(p, before[name.replace("q_proj.base.", "q_proj.")], rtol=0, atol=0)
    assert result.history[0]["kl"] == pytest.approx(q1_only.history[0]["kl"], rel=1e-6)
    after = model.state_dict()
    renamed = {k: k.replace("q_proj.", "q_proj.base.") if k.replace("q_proj.", "q_proj.base.") in after else k
               for k in before}  # only layer 1 has the search projection wrapper
    moved = {k for k, v in before.items() if not torch.equal(after[renamed[k]], v)}
    assert moved and all(k.startswith("model.layers.1.self_attn.") for k in moved)
    assert "model.layers.1.self_attn.k_proj.weight" in moved
    loaded = hf.from_pretrained(tmp_path / "run" / "model")  # trained projections live in model.safetensors
    ids = stream[:50][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="train="):
        rf.RetrofitSettings(train="everything")
