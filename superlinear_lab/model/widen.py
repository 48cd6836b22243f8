"""Function-preserving widening of a trained hybrid model: more residual width (`d_model`, and with it the SSM's
inner width and heads) and a wider MLP (`d_ff`), with the same outputs before any further training.

Used by `train` when `TrainConfig.widen_init` is set: a fine-tune can then start from a smaller model's weights
instead of from scratch. The rules, per kind of weight (old sizes d, f, e = d_inner; new d', f', e'):

* the **residual** gets new channels that start at zero and stay zero until trained: the embedding's new columns
  and every writer's new rows (SSM `out_proj`, attention `o_proj`, MLP `w_down`) are zero;
* every **reader** of the residual (SSM `in_proj`, attention `q1/q2/k/v_proj`, MLP `w_gate/w_up`) gets random new
  input columns: they read zeros now and give the new channels a gradient later;
* an **RMSNorm over the residual** (and the SSM's gated norm over its inner width, 2× as wide: the same ratio)
  divides by the RMS of more channels, the new ones zero: its old gains are scaled by sqrt(old / new) and the
  config's `norm_eps` by old / new, so the old channels come out unchanged (`widened_config` sets it);
* new **SSM heads** read nothing (`in_proj`'s new x rows and the conv bias of those channels are zero, so their
  input, state and output stay zero) and get random output columns in `out_proj`, through which they learn;
* new **MLP units** compute something (random `w_gate`/`w_up` rows) but write nothing (zero `w_down` columns).

The tied output head reads the final norm, whose new channels are zero, so the logits are unchanged.
"""
from __future__ import annotations

import math
from dataclasses import replace
import torch

from .config import ModelConfig
from .hybrid import HybridLM

WIDENABLE = ("d_model", "d_ff")


def widened_config(old: ModelConfig, d_model: int | None = None, d_ff: int | None = None) -> ModelConfig:
    """`old` with a larger `d_model` / `d_ff` and the `norm_eps` that keeps the widened norms exact
    (`old.norm_eps * old.d_model / d_model`)."""
    d_model, d_ff = d_model or old.d_model, d_ff or old.d_ff
    return replace(old, d_model=d_model, d_ff=d_ff, norm_eps=old.norm_eps * old.d_model / d_model)


def _check(old: ModelConfig, new: ModelConfig) -> None:
    for name in WIDENABLE:
        if getattr(new, name) < getattr(old, name):
            raise ValueError(f"{name}: {getattr(new, name)} < {getattr(old, name)}; widening cannot narrow")
    expected = widened_config(old, new.d_model, new.d_ff).to_dict() | {"span": None}
    got = new.to_dict() | {"span": None}
    diff = sorted(k for k in expected if expected[k] != got.get(k) and k != "norm_eps")
    if diff:
        raise ValueError(f"only {', '.join(WIDENABLE)} can be widened; these differ too: {diff}")
    if not math.isclose(new.norm_eps, expected["norm_eps"], rel_tol=1e-9):
        raise ValueError(f"norm_eps={new.norm_eps!r}: a model widened from d_model {old.d_model} to {new.d_model} "
                         f"needs {expected['norm_eps']!r} (widened_config) to compute what the source computes")


def widen_model(source: HybridLM, new: ModelConfig, seed: int = 0) -> HybridLM:
    """A `HybridLM(new)` (fp32, on the CPU) computing what `source` computes; `new` = `widened_config(source.cfg,
    d_model, d_ff)` (any span geometry: it has no weights). New random weights come from `seed` with
    `new.init_std`; the new SSM heads' dt_bias / A_log / D from `HybridLM(new)`'s own seeded initialisation.

    Raises:
        ValueError: `new` narrows, changes another field, or has another `norm_eps`."""
    old = source.cfg
    _check(old, new)
    gen = torch.Generator().manual_seed(seed)
    src = {k: v.detach().to("cpu", torch.float32) for k, v in source.state_dict().items()}
    target = HybridLM(new)  # seeded random init; only its new SSM heads' dt_bias / A_log / D are kept
    out = {}
    d, d2, f, f2 = old.d_model, new.d_model, old.d_ff, new.d_ff
    e, e2 = old.d_inner, new.d_inner
    h, h2 = old.ssm_heads, new.ssm_heads
    n = old.ssm_state

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * new.init_std

    def norm_gain(g: torch.Tensor, width: int) -> torch.Tensor:  # [old] -> [width]: the old channels unchanged
        scale = math.sqrt(g.numel() / width)
        return torch.cat([g * scale, torch.full((width - g.numel(),), float(g.abs().mean()) * scale)])

    def read_residual(w: torch.Tensor) -> torch.Tensor:  # [out, d] -> [out, d']: random new input columns
        return torch.cat([w, rand(w.shape[0], d2 - d)], dim=1)

    def write_residual(w: torch.Tensor) -> torch.Tensor:  # [d, in] -> [d', in]: zero new output rows
        return torch.cat([w, w.new_zeros(d2 - d, w.shape[1])], dim=0)

    for key, w in src.items():
        if key == "embed.weight":
            out[key] = torch.cat([w, w.new_zeros(w.shape[0], d2 - d)], dim=1)
        elif key.endswith(("norm1.weight", "norm2.weight")) or key == "norm_f.weight":
            out[key] = norm_gain(w, d2)
        elif key.endswith("mlp.w_gate.weight") or key.endswith("mlp.w_up.weight"):
            out[key] = torch.cat([read_residual(w), rand(f2 - f, d2)], dim=0)
        elif key.endswith("mlp.w_down.weight"):
            out[key] = write_residual(torch.cat([w, w.new_zeros(d, f2 - f)], dim=1))
        elif key.endswith(("q1_proj.weight", "q2_proj.weight", "k_proj.weight", "v_proj.weight")) \
                or key == "lm_head.weight":  # an untied head reads the final norm, whose new channels are zero
            out[key] = read_residual(w)
        elif key.endswith("o_proj.weight"):
            out[key] = write_residual(w)
        elif key.endswith("mixer.in_proj.weight"):  # rows: z [e] | x [e] | B [n] | C [n] | dt [h]
            z, x, bc, dt = torch.split(read_residual(w), [e, e, 2 * n, h])
            out[key] = torch.cat([z, rand(e2 - e, d2), x, x.new_zeros(e2 - e, d2), bc, dt, rand(h2 - h, d2)])
        elif key.endswith("mixer.conv.weight") or key.endswith("mixer.conv.bias"):  # channels: x [e] | B | C
            x, bc = torch.split(w, [e, 2 * n])
            fresh = x.new_zeros(e2 - e, *x.shape[1:]) if key.endswith("bias") else rand(e2 - e, *x.shape[1:])
            out[key] = torch.cat([x, fresh, bc])
        elif key.endswith("mixer.norm.weight"):  # gated RMSNorm over the inner width
            out[key] = norm_gain(w, e2)
        elif key.endswith("mixer.out_proj.weight"):  # [d, e] -> [d', e']: new heads write through random columns
            out[key] = write_residual(torch.cat([w, rand(d, e2 - e)], dim=1))
        elif key.endswith(("mixer.dt_bias", "mixer.A_log", "mixer.D")):
            out[key] = w  # new heads: filled below from the target's own Mamba-2 initialisation
        else:
            raise ValueError(f"widen_model does not know how to widen {key!r}")
    ssm_init = target.state_dict()  # the target's seeded random init: Mamba-2 values for dt_bias / A_log / D
    for key in [k for k in out if k.endswith(("mixer.dt_bias", "mixer.A_log", "mixer.D"))]:
        out[key] = torch.cat([out[key], ssm_init[key][h:h2].to(torch.float32)])
    target.load_state_dict(out)
    return target.eval()
