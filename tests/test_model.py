"""The hybrid model: config, tokenizer, the chunked SSM scan, cached forward == full forward, weights on disk."""
from __future__ import annotations

import json

import pytest
import torch

from superlinear_kernels import SpanConfig
from superlinear_lab.model import ByteTokenizer, HybridLM, ModelConfig, load_model, model_fingerprint, save_model
from superlinear_lab.model.ssm import chunked_scan, recurrent_step

from helpers import assert_close


pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_model_is_small(model):
    n = model.num_parameters()
    assert 1_000_000 <= n <= 3_000_000, n
    assert model.cfg.attention_layers and model.cfg.mamba_layers  # a hybrid: both mixers present
    assert [i for i, _ in model.routing_layers()] == model.cfg.attention_layers


def test_config_json_round_trip():
    cfg = ModelConfig(pattern="MM*", d_model=64, n_heads=4, n_kv_heads=1, head_dim=16, d_ff=96,
                      span=SpanConfig.release(), ssm_head_dim=16)
    back = ModelConfig.from_json(cfg.to_json())
    assert back == cfg and json.loads(cfg.to_json())["model_type"] == "superlinear-lab-hybrid"
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_dict({**cfg.to_dict(), "model_type": "llama"})
    with pytest.raises(ValueError, match="pattern"):
        ModelConfig(pattern="MX*")
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(n_heads=3, n_kv_heads=2)


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — 東京 🙂\n\ttabs"
    ids = tok.encode(text, bos=True)
    assert ids[0] == tok.bos_id and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == "<|bos|>" + text and tok.decode(ids, skip_special=True) == text
    assert tok.token_strings([104, 10, 0xE2, tok.eos_id, -1]) == ["h", "\\n", "<0xE2>", "<|eos|>", ""]
    feed = tok.stream_decoder()
    assert "".join(feed(i) for i in tok.encode("東京")) == "東京"
    with pytest.raises(ValueError):
        tok.id_to_token(tok.vocab_size)


def test_chunked_scan_matches_recurrence():
    gen = torch.Generator().manual_seed(0)
    b, length, h, p, n = 2, 37, 3, 4, 5
    x = torch.randn(b, length, h, p, generator=gen, dtype=torch.float64)
    dt = torch.rand(b, length, h, generator=gen, dtype=torch.float64) * 0.5
    a = -torch.rand(h, generator=gen, dtype=torch.float64) * 2
    bm = torch.randn(b, length, n, generator=gen, dtype=torch.float64)
    cm = torch.randn(b, length, n, generator=gen, dtype=torch.float64)
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    state, ys = s0.clone(), []
    for t in range(length):  # the definition, one token at a time
        state = torch.exp(dt[:, t] * a)[:, :, None, None] * state + \
            (dt[:, t, :, None] * x[:, t])[..., None] * bm[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", state, cm[:, t]))
    ref = torch.stack(ys, dim=1)
    for chunk in (1, 8, 16, 64):
        y, final = chunked_scan(x, dt, a, bm, cm, s0, chunk)
        assert_close(f"y chunk={chunk}", ref, y, 1e-12)
        assert_close(f"state chunk={chunk}", state, final, 1e-12)
    state = s0  # the one-token form, token by token
    for t in range(length):
        y, state = recurrent_step(x[:, t:t + 1], dt[:, t:t + 1], a, bm[:, t:t + 1], cm[:, t:t + 1], state)
        assert_close(f"recurrent y at {t}", ref[:, t:t + 1], y, 1e-12)
    assert_close("recurrent final state", final, state, 1e-12)


@pytest.mark.parametrize("splits", [(300,), (1, 299), (17, 100, 183), (64, 64, 64, 64, 44)], ids=str)
def test_cached_chunks_equal_full_forward(model, splits):
    ids = torch.randint(0, 256, (1, sum(splits)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(400)
        parts, start = [], 0
        for n in splits:
            parts.append(model(ids[:, start:start + n], cache, start))
            start += n
    assert_close("logits", full, torch.cat(parts, dim=1), 2e-5)


def test_oracle_and_torch_backends_agree():
    m = load_model("tiny", backend="oracle")
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(ids)
        got = m.set_backend("torch")(ids)
    assert_close("logits", ref, got, 1e-5)


def test_bad_ids_rejected(model):
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[0, 9999]]))
    with pytest.raises(ValueError, match="int tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros(1, 5, dtype=torch.long), model.new_cache(4), 0)


def test_weights_round_trip_and_shipped_model_preferred(model, tmp_path, monkeypatch):
    trained = HybridLM(ModelConfig(init_seed=7))
    save_model(trained, tmp_path / "tiny")
    monkeypatch.setenv("SUPERLINEAR_LAB_MODELS", str(tmp_path))
    shipped = load_model("tiny", backend="torch")
    assert shipped.source["kind"] == "directory"
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(shipped(ids), trained.eval().set_backend("torch")(ids))
    assert model_fingerprint(shipped)[0] != model_fingerprint(model)[0]
    explicit = load_model(path=tmp_path / "tiny", backend="torch")
    assert model_fingerprint(explicit)[0] == model_fingerprint(shipped)[0]
    with pytest.raises(FileNotFoundError):
        load_model(path=tmp_path / "missing")
    with pytest.raises(ValueError, match="no directory"):
        load_model("no-such-model")


def test_random_init_is_deterministic(model):
    again = load_model("tiny", backend="torch")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert model_fingerprint(again) == model_fingerprint(model)


def test_deeply_nested_model_config_is_a_clear_error():
    from superlinear_lab.model import ModelConfig

    with pytest.raises(ValueError, match="nested too deeply"):
        ModelConfig.from_json("[" * 100_000 + "]" * 100_000)
