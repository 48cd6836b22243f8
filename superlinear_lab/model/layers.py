"""Small building blocks of the hybrid model: RMSNorm (plain and gated) and the SwiGLU MLP."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim (computed in fp32, cast back)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., dim]; with `gate` (same shape) this is Mamba-2's gated norm: rmsnorm(x * silu(gate))."""
        xf = x.float()
        if gate is not None:
            xf = xf * nn.functional.silu(gate.float())
        # torch's rms_norm: x * rsqrt(mean(x²) + eps) * weight, one fused kernel on CUDA (a decode step runs 16 norms)
        return nn.functional.rms_norm(xf, (xf.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """MLP after every mixer: w_down(silu(w_gate x) * w_up x); x [..., d_model] -> [..., d_model]."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(nn.functional.silu(self.w_gate(x)) * self.w_up(x))
