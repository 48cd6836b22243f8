"""`open_model(spec)`: a shipped name, our model directory and a Superlinear-Exp checkpoint each open as the model
they hold (checked by weights, not by type), and a spec that names nothing raises naming the spec."""
from __future__ import annotations

import json

import pytest
import torch

from superlinear_lab.loaders import open_model
from superlinear_lab.model import HybridLM, ModelConfig, save_model
from superlinear_lab.model.io import sha256_file


def test_a_shipped_name_opens_the_shipped_weights():
    model = open_model("tiny", backend="torch")
    assert model.model_id == "superlinear-lab/tiny" and model.source["kind"] == "shipped"
    assert model.source["weights_sha256"] == sha256_file(model.source["path"] + "/model.safetensors")


def test_our_model_directory_opens_with_its_weights(tmp_path):
    saved = HybridLM(ModelConfig(init_seed=5))
    save_model(saved, tmp_path / "mine")
    model = open_model(tmp_path / "mine", backend="torch")
    assert model.model_id == "superlinear-lab/mine" and model.source["kind"] == "directory"
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert open_model(str(tmp_path / "mine"), dtype="float16").dtype == torch.float16


def test_a_superlinear_exp_checkpoint_opens_through_the_checkpoint_loader(tmp_path):
    pytest.importorskip("transformers", minversion="5.24", reason="Superlinear-Exp checkpoints need the extra hf")
    from superlinear_lab.loaders import SuperlinearExpConfig, save_checkpoint
    from superlinear_lab.loaders.model import SuperlinearExpLM

    saved = SuperlinearExpLM(SuperlinearExpConfig.tiny()).init_random(3)
    save_checkpoint(saved, tmp_path / "exp")
    model = open_model(tmp_path / "exp", backend="torch")
    assert isinstance(model, SuperlinearExpLM) and model.model_id == "superlinear-exp/exp"
    assert model.source["kind"] == "checkpoint" and model.source["weights_sha256"]
    ids = torch.arange(40).remainder(SuperlinearExpConfig.tiny().vocab_size)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), saved.eval().set_backend("torch")(ids))


def test_specs_that_name_nothing_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        open_model(tmp_path / "absent")
    with pytest.raises(ValueError, match="not a shipped model"):
        open_model("tinyy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        open_model(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama', which none"):
        open_model(tmp_path / "other")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="a file"):
        open_model(tmp_path / "file.txt")


def test_report_command_opens_a_directory_or_a_checkpoint(tmp_path, capsys):
    pytest.importorskip("transformers", minversion="5.24", reason="Superlinear-Exp checkpoints need the extra hf")
    from superlinear_lab.cli import main
    from superlinear_lab.loaders import SuperlinearExpConfig, save_checkpoint
    from superlinear_lab.loaders.model import SuperlinearExpLM
    from superlinear_lab.loaders.tokenizer import byte_level_tokenizer_json

    save_checkpoint(SuperlinearExpLM(SuperlinearExpConfig.tiny()).init_random(1), tmp_path / "exp",
                    tokenizer_json=byte_level_tokenizer_json())
    save_model(HybridLM(ModelConfig(init_seed=2)), tmp_path / "mine")
    (tmp_path / "doc.txt").write_text("The archive code is 7731. " * 12)
    for spec, model_id in ((tmp_path / "exp", "superlinear-exp/exp"), (tmp_path / "mine", "superlinear-lab/mine")):
        out = tmp_path / f"{spec.name}.html"
        assert main(["report", str(tmp_path / "doc.txt"), "--model", str(spec), "--backend", "torch",
                     "-o", str(out)]) == 0
        assert f"(model: {model_id} (" in capsys.readouterr().out
        assert out.stat().st_size > 1000
    assert main(["report", str(tmp_path / "doc.txt"), "--model", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_a_transformers_directory_opens_as_an_hf_model(tmp_path):
    transformers = pytest.importorskip("transformers", minversion="5.24", reason="needs the extra hf")
    from superlinear_lab.model import describe_model

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    model = open_model(tmp_path / "llama", backend="torch")
    assert model.model_id == "hf/llama" and model.source["kind"] == "transformers"
    assert describe_model(model).startswith("hf/llama (transformers, weights sha256 ")
    with torch.no_grad():
        assert model(torch.arange(20)[None]).shape == (1, 20, 64)
