"""Where the models compute in fp32 under autocast: the one rule, used by `HybridLM`, `SuperlinearExpLM`, the
Mamba-2 scan and the training loss.

Under ``torch.autocast(dtype=torch.bfloat16)`` every matmul-like op (``@``, ``einsum``, ``linear``, ``bmm``) runs
in bf16 and returns bf16, even when its inputs were cast to fp32 first. The projections and MLPs should (they are
the bulk of the FLOPs), but a few places compound bf16 rounding or feed a discrete choice, so they run outside
autocast, in fp32, on the tensors they are given:

* the attention call (search scores, gate logits and softmax, span/window attention and the merge on the oracle
  and torch backends; the Triton kernels accumulate in fp32 whatever autocast says);
* the Mamba-2 chunked scan (decays ``exp(cumsum(dt·A))`` times sums over up to ``ssm_chunk`` tokens), its dt
  pre-activation (the in_proj's last H rows again, in fp32: dt's rounding feeds ``exp(dt·A)``) and its short
  depthwise convolution (a few multiply-adds per channel);
* the output head (logits and so the cross-entropy in fp32);
* the training loss's routing scores (``train.routing_loss``).

`bench/model_grad_check.py` measures what this changes (bench/BENCHMARKS.md "bf16 gradients, session 5"). Outside
autocast (fp32, or a model cast to bf16 without autocast) `fp32_region` does nothing, so fp32 results are
unchanged bit for bit.
"""
from __future__ import annotations

import contextlib

import torch

# Switch for measurements only (bench/model_grad_check.py's "without" rows): False computes these regions under
# autocast like the rest of the model, as before session 5.
FP32_REGIONS = True


def fp32_regions_on(x: torch.Tensor) -> bool:
    """Whether `fp32_region(x)` switches autocast off: autocast is on for `x`'s device type (and the regions are)."""
    return FP32_REGIONS and torch.is_autocast_enabled(x.device.type)


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context in which autocast is off for `x`'s device type (a no-op when autocast is not on there).

    Ops inside see the dtypes they are given: cast to fp32 (``.float()``) what must be computed in fp32.
    """
    if fp32_regions_on(x):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [..., vocab] of hidden states x [..., d_model] against the output weight [vocab, d_model].

    Under autocast the product is taken in fp32 (see the module docstring); otherwise in the model's dtype, then
    cast to fp32, as always.
    """
    if fp32_regions_on(x):
        with fp32_region(x):
            return x.float() @ weight.float().t()
    return (x @ weight.t()).float()
