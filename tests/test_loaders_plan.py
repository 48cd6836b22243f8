"""`plan_memory` reproduces the released model's published memory facts (docs/algorithm.md §5.4), reads weights from shard
headers only, and the `superlinear-lab plan` command prints it."""
from __future__ import annotations

import json

import pytest

from superlinear_lab.cli import main
from superlinear_lab.loaders import SuperlinearExpConfig, parse_bytes, parse_tokens, plan_memory

GIB = 2**30
RELEASED = SuperlinearExpConfig.released()


def test_released_kv_bytes_per_token():
    plan = plan_memory(RELEASED, "80GB", dtype="float16")
    assert plan.kv_bytes_per_token == 6 * 2 * 2 * 128 * 2 == 6144
    assert plan.kv_bytes(2**20) == 6 * GIB  # exactly 6.0 GiB per 2^20 tokens
    assert plan_memory(RELEASED, "80GB", dtype="bfloat16").kv_bytes_per_token == 6144
    assert plan_memory(RELEASED, "80GB", dtype="float32").kv_bytes_per_token == 12288  # fp32 doubles it


def test_released_kv_at_the_published_context_lengths():
    plan = plan_memory(RELEASED, "141GB")
    assert round(plan.kv_bytes(131_072) / 1e9, 1) == 0.8
    assert round(plan.kv_bytes(1_048_576) / 1e9, 1) == 6.4
    assert round(plan.kv_bytes(10_485_760) / 1e9) == 64
    assert 126e9 < plan.weight_bytes + plan.kv_bytes(10_485_760) < 129e9  # "≈ 127 GB" at 10M tokens


def test_released_weights_about_60_gb_at_16_bit():
    plan = plan_memory(RELEASED, "80GB", dtype="bfloat16")
    assert plan.n_parameters == 31_644_000_576
    assert 60e9 <= plan.weight_bytes <= 64e9  # "≈ 60–63 GB fp16 weights"
    assert round(plan.weight_bytes / GIB) == 59
    assert plan.weight_source == "parameter count of the built layout"
    assert plan_memory(RELEASED, "141GB", dtype="float32").weight_bytes == pytest.approx(2 * plan.weight_bytes,
                                                                                         rel=1e-3)


def test_released_recurrent_state_per_session():
    plan = plan_memory(RELEASED, "80GB")
    assert plan.ssm_elements == 23 * 64 * 64 * 128 == 12_058_624  # "about 12.1M ssm elements"
    assert round(plan.ssm_elements * 4 / 1e6) == 48  # "≈ 48 MB in fp32"
    assert plan.conv_elements == 23 * (64 * 64 + 2 * 8 * 128) * 3  # conv_kernel - 1 = 3 columns kept
    assert plan.state_bytes_per_session == plan.ssm_elements * 4 + plan.conv_elements * 2


@pytest.mark.parametrize("gpu", ["80GB", "141GB"])
@pytest.mark.parametrize("sessions", [1, 4])
def test_longest_context_is_the_largest_that_fits(gpu, sessions):
    plan = plan_memory(RELEASED, gpu, sessions=sessions)
    n = plan.max_context_per_session
    assert plan.fits and plan.total_bytes(n) <= plan.gpu_bytes < plan.total_bytes(n + 1)


def test_released_on_80_and_141_gb_cards():
    on_80 = plan_memory(RELEASED, "80GB").max_context_per_session
    on_141 = plan_memory(RELEASED, "141GB").max_context_per_session
    assert 2**20 < on_80 < 3 * 2**20  # a 1M-token session fits on an 80 GB card
    assert 10 * 2**20 < on_141 < 13 * 2**20  # a 10M-token session fits on a 141 GB card
    assert not plan_memory(RELEASED, "40GB").fits


def test_plan_reads_shard_headers_only(tmp_path, monkeypatch):
    pytest.importorskip("transformers", minversion="5.24")
    import safetensors

    from superlinear_lab.loaders import save_checkpoint
    from superlinear_lab.loaders.model import SuperlinearExpLM

    model = SuperlinearExpLM(SuperlinearExpConfig.tiny()).init_random(0)
    save_checkpoint(model, tmp_path, max_shard_bytes=300_000)

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("plan_memory must not open tensors")

    monkeypatch.setattr(safetensors, "safe_open", no_tensor_reads)
    monkeypatch.setattr("superlinear_lab.loaders.checkpoint.safe_open", no_tensor_reads)
    plan = plan_memory(tmp_path, "1GB")
    stored = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())
    assert plan.weight_source.startswith("shard headers") and plan.dtype == "float32"
    assert plan.weight_bytes == stored
    assert plan.n_parameters == SuperlinearExpConfig.tiny().parameter_counts()["total"]
    half = plan_memory(tmp_path, "1GB", dtype="float16")
    router = sum(b.mixer.gate.weight.numel() + b.mixer.gate.e_score_correction_bias.numel()
                 for b in model.blocks if b.kind == "E")
    assert half.weight_bytes == (stored - 4 * router) // 2 + 4 * router  # the router stays fp32


def test_plan_from_a_config_json_with_auto_map(tmp_path):
    cfg = RELEASED.to_hf_dict() | {"auto_map": {"AutoModelForCausalLM": "modeling_superlinear.Model"}}
    for key in [k for k in cfg if k.startswith("span_attention_")]:
        del cfg[key]  # the released config passes them at load time; memory does not depend on them
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plan = plan_memory(tmp_path / "config.json", "80GB")
    assert plan.kv_bytes_per_token == 6144 and plan.n_parameters == 31_644_000_576


def test_sizes_parse():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("141 GB") == 141 * 10**9 and parse_bytes(1024) == 1024 and parse_bytes("1e9") == 10**9
    assert parse_tokens("1M") == 2**20 and parse_tokens("128K") == 131_072 and parse_tokens("5000") == 5000
    with pytest.raises(ValueError, match="80XB"):
        parse_bytes("80XB")
    with pytest.raises(ValueError, match="sessions=0"):
        plan_memory(RELEASED, "80GB", sessions=0)


def test_cli_plan(capsys):
    assert main(["plan", "released", "--gpu-mem", "80GB", "--context", "1M"]) == 0
    out = capsys.readouterr().out
    assert "6,144 B" in out and "longest context per session" in out and "-> fits" in out
    assert main(["plan", "released", "--gpu-mem", "141GB", "--sessions", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kv_bytes_per_token"] == 6144 and doc["sessions"] == 2 and doc["fits"]


def test_cli_plan_errors_and_help(capsys, tmp_path):
    assert main(["plan", str(tmp_path / "missing"), "--gpu-mem", "80GB"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["plan", "--help"])
    assert info.value.code == 0 and "--gpu-mem" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "released", "--gpu-mem", "lots"])
    assert "expected a size" in capsys.readouterr().err
