"""Every refusal of `load_checkpoint`, each asserting that the message names the file and the key; plus the
lenient parts (NaN/Infinity in config.json, span parameters given at load time, acknowledged auto_map)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers", minversion="5.24", reason="the loaders need the optional extra hf")

from safetensors.torch import load_file, save_file  # noqa: E402

from superlinear_kernels import SpanConfig  # noqa: E402
from superlinear_lab.loaders import CheckpointError, SuperlinearExpConfig, load_checkpoint, save_checkpoint  # noqa: E402
from superlinear_lab.loaders.model import SuperlinearExpLM  # noqa: E402

Q1 = "backbone.layers.3.mixer.q1_proj.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    save_checkpoint(SuperlinearExpLM(SuperlinearExpConfig.tiny()).init_random(0), path, max_shard_bytes=400_000)
    return path


@pytest.fixture
def ckpt(base, tmp_path):
    """A fresh copy of the tiny checkpoint to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(base, path)
    return path


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def weight_map(ckpt):
    return json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]


def edit_shard_of(ckpt, key, fn):
    """Apply fn(tensors) to the shard holding `key`; returns the shard's file name."""
    shard = weight_map(ckpt)[key]
    tensors = load_file(str(ckpt / shard))
    fn(tensors)
    save_file(tensors, str(ckpt / shard))
    return shard


def refused(ckpt, *names, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt, backend="torch", **kwargs)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return message


# ---------------------------------------------------------------------- config.json
def test_wrong_model_type(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(model_type="nemotron_h"))
    refused(ckpt, "config.json", "'model_type'", "nemotron_h")


def test_auto_map_is_refused_unless_acknowledged(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(auto_map={"AutoModelForCausalLM": "modeling.Model"}))
    (ckpt / "modeling.py").write_text("raise SystemExit('remote code must never run')\n")
    refused(ckpt, "config.json", "'auto_map'", "ignore_auto_map=True")
    model = load_checkpoint(ckpt, ignore_auto_map=True, backend="torch")  # the .py file is never imported
    assert model.cfg.pattern == "MEM*EMEM*EM-E"


def test_missing_shape_field(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.pop("ssm_state_size"))
    refused(ckpt, "config.json", "'ssm_state_size'", "missing")


def test_unknown_span_key_is_refused_other_unknown_keys_warn(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(span_attention_mode="dense"))
    refused(ckpt, "config.json", "'span_attention_mode'")
    edit_json(ckpt / "config.json", lambda d: [d.pop("span_attention_mode"), d.update(publisher_note="hi")])
    with pytest.warns(UserWarning, match=r"config.json: keys not understood .*'publisher_note'"):
        model = load_checkpoint(ckpt, backend="torch")
    assert model.cfg.ignored_keys == ("publisher_note",)


def test_bad_layer_pattern(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(hybrid_override_pattern="MEM*EMEM*EM-X"))
    refused(ckpt, "config.json", "'hybrid_override_pattern'")


def test_span_parameters_missing_then_given_at_load_time(ckpt):
    edit_json(ckpt / "config.json", lambda d: [d.pop(k) for k in list(d) if k.startswith("span_attention_")])
    refused(ckpt, "config.json", "'span_attention_search_power'", "SpanConfig.release()")
    model = load_checkpoint(ckpt, span=SpanConfig.default(), backend="torch")
    assert all(layer.span_config == SpanConfig.default() for _, layer in model.routing_layers())


def test_invalid_span_parameters(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(span_attention_span_power=1.5))
    refused(ckpt, "config.json", "span_attention_", "span_power")


def test_nan_and_infinity_literals_are_read(ckpt):
    text = (ckpt / "config.json").read_text()
    data = json.loads(text)
    assert data["time_step_limit"] == [0.0, float("inf")]
    assert "Infinity" in text  # json.dumps already writes the non-standard literal
    edit_json(ckpt / "config.json", lambda d: d.update(initializer_range=float("nan")))
    assert "NaN" in (ckpt / "config.json").read_text()
    model = load_checkpoint(ckpt, backend="torch")
    assert model.cfg.time_step_limit == (0.0, float("inf"))


# ---------------------------------------------------------------------- pickle and shard files
def test_pickle_shard_named_in_the_index(ckpt):
    wm = weight_map(ckpt)
    edit_json(ckpt / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({Q1: "pytorch_model-00002.bin"}))
    (ckpt / "pytorch_model-00002.bin").write_bytes(b"\x80\x04not really")
    assert wm[Q1] != "pytorch_model-00002.bin"
    refused(ckpt, "pytorch_model-00002.bin", repr(Q1), "pickle")


def test_pickle_only_checkpoint(ckpt):
    for p in list(ckpt.glob("*.safetensors*")):
        p.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"PK\x03\x04zip")
    refused(ckpt, "pytorch_model.bin", "pickle")


def test_pickle_file_path(ckpt):
    path = ckpt / "weights.pt"
    path.write_bytes(b"PK\x03\x04zip")
    with pytest.raises(CheckpointError, match="weights.pt: pickle-based"):
        load_checkpoint(path)


def test_pickle_disguised_as_safetensors(ckpt):
    shard = weight_map(ckpt)[Q1]
    (ckpt / shard).write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # what torch.save writes: a zip archive
    refused(ckpt, shard, "key '", "pickle/zip")


def test_missing_shard(ckpt):
    shard = weight_map(ckpt)[Q1]
    (ckpt / shard).unlink()
    refused(ckpt, shard, "key '", "missing")


def test_shard_outside_the_directory(ckpt):
    edit_json(ckpt / "model.safetensors.index.json", lambda d: d["weight_map"].update({Q1: "../elsewhere.safetensors"}))
    refused(ckpt, "model.safetensors.index.json", repr(Q1), "outside")


def test_truncated_shard_header(ckpt):
    shard = weight_map(ckpt)[Q1]
    (ckpt / shard).write_bytes((ckpt / shard).read_bytes()[:20])
    refused(ckpt, shard, "key '", "not a safetensors file")


# ---------------------------------------------------------------------- keys
def test_missing_key(ckpt):
    edit_json(ckpt / "model.safetensors.index.json", lambda d: d["weight_map"].pop(Q1))
    refused(ckpt, "model.safetensors.index.json", repr(Q1), "missing", "q1_proj.weight")


def test_unexpected_key(ckpt):
    extra = "backbone.layers.3.mixer.q_norm.weight"
    shard = edit_shard_of(ckpt, Q1, lambda t: t.update({extra: torch.ones(16)}))
    edit_json(ckpt / "model.safetensors.index.json", lambda d: d["weight_map"].update({extra: shard}))
    refused(ckpt, shard, repr(extra), "unexpected")


def test_key_listed_but_not_in_its_shard(ckpt):
    shard = edit_shard_of(ckpt, Q1, lambda t: t.pop(Q1))
    refused(ckpt, shard, repr(Q1), "not stored in the shard")


def test_tied_checkpoint_with_a_head_is_unexpected(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(tie_word_embeddings=True))
    refused(ckpt, "'lm_head.weight'", "unexpected", ".safetensors")


# ---------------------------------------------------------------------- shapes and dtypes
def test_shape_mismatch(ckpt):
    shard = edit_shard_of(ckpt, Q1, lambda t: t.update({Q1: torch.zeros(64, 32)}))
    refused(ckpt, shard, repr(Q1), "shape [64, 32]", "[64, 64]")


def test_expert_shape_mismatch(ckpt):
    key = "backbone.layers.4.mixer.experts.5.up_proj.weight"
    shard = edit_shard_of(ckpt, key, lambda t: t.update({key: torch.zeros(31, 64)}))
    refused(ckpt, shard, repr(key), "shape")


def test_float_dtype_mismatch(ckpt):
    shard = edit_shard_of(ckpt, Q1, lambda t: t.update({Q1: t[Q1].half()}))
    refused(ckpt, shard, repr(Q1), "dtype F16", "float32")


def test_integer_tensor_is_refused(ckpt):
    key = "backbone.layers.0.mixer.A_log"
    shard = edit_shard_of(ckpt, key, lambda t: t.update({key: t[key].to(torch.int32)}))
    refused(ckpt, shard, repr(key), "dtype I32")


def test_fp32_router_in_a_16_bit_checkpoint_is_accepted(tmp_path):
    model = SuperlinearExpLM(SuperlinearExpConfig.tiny()).init_random(1).to(torch.bfloat16).keep_router_fp32()
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path, backend="torch")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.blocks[1].mixer.gate.weight, model.blocks[1].mixer.gate.weight)
    # ... but an fp32 attention weight in a bf16 checkpoint is a mismatch
    key = Q1
    shard = edit_shard_of(tmp_path, key, lambda t: t.update({key: t[key].float()}))
    with pytest.raises(CheckpointError, match=rf"{shard}: key '{key}': dtype F32, expected bfloat16"):
        load_checkpoint(tmp_path)


def test_unsupported_checkpoint_dtype(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(torch_dtype="float8_e4m3fn"))
    refused(ckpt, "config.json", "'torch_dtype'", "float8_e4m3fn")


def test_key_map_row_that_matches_nothing(ckpt):
    refused(ckpt, "key_map", "'blocks.{i}.mixer.q3_proj.weight'",
            key_map={"blocks.{i}.mixer.q3_proj.weight": "backbone.layers.{i}.mixer.q3.weight"})


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


# ---------------------------------------------------------------------- issue 18 (#3, #11, #12), loader side
@pytest.mark.parametrize("key,value", [("layer_norm_epsilon", float("nan")), ("layer_norm_epsilon", float("inf")),
                                       ("routed_scaling_factor", float("nan")),
                                       ("time_step_limit", [float("nan"), float("inf")]),
                                       ("time_step_limit", [0.0, float("nan")])])
def test_non_finite_numbers_the_model_computes_with_are_refused(ckpt, key, value):
    edit_json(ckpt / "config.json", lambda d: d.update({key: value}))
    refused(ckpt, "config.json", key)


def test_deeply_nested_config_is_a_checkpoint_error(ckpt):
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(ckpt, "config.json", "nested too deeply")


def test_a_shard_symlinked_out_of_the_folder_is_refused(ckpt, tmp_path):
    shard = weight_map(ckpt)[Q1]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt / shard, outside)
    (ckpt / shard).symlink_to(outside)
    refused(ckpt, shard, "outside the checkpoint directory")


def test_deeply_nested_safetensors_header_is_a_checkpoint_error(tmp_path):
    import struct

    from superlinear_lab.loaders import read_safetensors_header

    header = ('{"a":' * 60_000 + "1" + "}" * 60_000).encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="deep.safetensors: malformed safetensors header"):
        read_safetensors_header(path)
