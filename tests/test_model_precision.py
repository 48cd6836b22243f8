"""The model's fp32 regions under autocast (superlinear_lab/model/precision.py): the attention call, the Mamba-2 scan
and its dt, the output head and the routing loss run in fp32 under bf16 autocast; outside autocast nothing changes."""
from __future__ import annotations

import pytest
import torch

import superlinear_lab.model.attention as attention_module
import superlinear_lab.model.ssm as ssm_module
from superlinear_kernels import SpanConfig
from superlinear_lab.evaluate import capture_routing, evidence_pairs
from superlinear_lab.model import HybridLM, ModelConfig, precision
from superlinear_lab.train import TrainConfig, make_batch, routing_loss, step_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(pattern="M*", d_model=64, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=96, ssm_head_dim=16,
                  ssm_chunk=16, span=SpanConfig.default(), init_seed=3)


def ids_of(length: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def spies(monkeypatch):
    """Record, at each attention call and each chunked scan, whether CPU autocast is on and the scan's dt."""
    seen = {"attention": [], "scan": [], "dt": [], "x": []}
    real_attention, real_scan = attention_module.superlinear_attention, ssm_module.chunked_scan

    def attention(*args, **kwargs):
        seen["attention"].append(torch.is_autocast_enabled("cpu"))
        return real_attention(*args, **kwargs)

    def scan(x, dt, *args):
        seen["scan"].append(torch.is_autocast_enabled("cpu"))
        seen["dt"].append(dt.detach().clone())
        seen["x"].append(x.detach().clone())
        return real_scan(x, dt, *args)
    monkeypatch.setattr(attention_module, "superlinear_attention", attention)
    monkeypatch.setattr(ssm_module, "chunked_scan", scan)
    return seen


def test_regions_run_in_fp32_under_autocast(spies):
    model = HybridLM(CFG).set_backend("oracle")
    mixer_in, head_in = [], []
    model.blocks[0].mixer.register_forward_pre_hook(lambda m, args: mixer_in.append(args[0].detach()))
    model.norm_f.register_forward_hook(lambda m, args, out: head_in.append(out.detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids_of(80))
    assert spies["attention"] == [False] and spies["scan"] == [False]
    # the head: the fp32 product of the final norm's output with the (tied) embedding
    assert logits.dtype == torch.float32
    assert torch.equal(logits, head_in[0].float() @ model.embed.weight.t())
    # dt: softplus of the in_proj's last H rows applied in fp32 (not the bf16 projection's rounded columns)
    mixer, heads = model.blocks[0].mixer, CFG.ssm_heads
    expected = torch.nn.functional.softplus(
        torch.nn.functional.linear(mixer_in[0].float(), mixer.in_proj.weight[-heads:]) + mixer.dt_bias)
    assert torch.equal(spies["dt"][0], expected)
    # the short conv: fp32 over the in_proj's (bf16) x/B/C columns
    d_in, n = CFG.d_inner, CFG.ssm_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xbc = mixer.in_proj(mixer_in[0])[..., d_in:2 * d_in + 2 * n]
    window = torch.nn.functional.pad(xbc.transpose(1, 2).float(), (CFG.conv_kernel - 1, 0))
    conv = torch.nn.functional.conv1d(window, mixer.conv.weight, mixer.conv.bias, groups=CFG.conv_dim)
    xs = torch.nn.functional.silu(conv).transpose(1, 2)[..., :d_in]
    assert torch.equal(spies["x"][0], xs.reshape(spies["x"][0].shape))


def test_switch_off_puts_the_regions_back_under_autocast(spies, monkeypatch):
    monkeypatch.setattr(precision, "FP32_REGIONS", False)
    model = HybridLM(CFG).set_backend("oracle")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids_of(80))
    assert spies["attention"] == [True] and spies["scan"] == [True]


@pytest.mark.parametrize("backend", ["oracle", "torch"])
def test_fp32_results_are_unchanged_by_the_regions(backend, monkeypatch):
    """Outside autocast the regions are no-ops: fp32 logits and gradients are bit-identical with the switch off."""
    def run():
        model = HybridLM(CFG).set_backend(backend)
        logits = model(ids_of(80))
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]
    on = run()
    monkeypatch.setattr(precision, "FP32_REGIONS", False)
    off = run()
    assert torch.equal(on[0], off[0])
    assert all(torch.equal(a, b) for a, b in zip(on[1], off[1]))


def test_routing_loss_scores_in_fp32_under_autocast():
    """The routing loss under autocast equals the same loss computed outside it on the same (bf16) records."""
    cfg = TrainConfig()
    examples = make_batch(TrainConfig(**{**cfg.__dict__, "stages": [[512, 1, 2]], "task_mix": {"niah": 1.0}}), 0)
    model = HybridLM(ModelConfig.from_dict(cfg.model)).set_backend("torch")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with capture_routing(model) as records:
            model(torch.tensor([e.ids for e in examples]))
        pairs = evidence_pairs(examples)
        assert all(q1.dtype == torch.bfloat16 for _, _, q1, _ in records.values())
        inside = routing_loss(records, model.cfg.span, pairs)[0]
    outside = routing_loss(records, model.cfg.span, pairs)[0]
    assert inside.dtype == torch.float32 and float(outside) > 0
    assert torch.equal(inside, outside)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and the whole training loss runs under autocast
        loss, stats = step_loss(model, cfg, examples, "cpu", False)
    assert torch.isfinite(loss) and stats["route"] > 0
