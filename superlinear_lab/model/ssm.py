"""`Mamba2Mixer`: a Mamba-2-style selective state-space layer (the "accumulate" layer, `M` in the pattern).

Per token t and head h (P channels, N state): dt_t = softplus(raw + dt_bias) > 0, decay a_t = exp(dt_t · A_h)
with A_h = -exp(A_log_h) < 0 (input-dependent through dt), and

    S_t = a_t · S_{t-1} + dt_t · x_t ⊗ B_t          S [H, P, N]
    y_t = S_t · C_t + D_h · x_t

x, B, C come from a short causal depthwise convolution of the input projection. The scan is the chunked
(SSD) form: inside a chunk of `ssm_chunk` tokens a masked [T × T] decay matrix, between chunks a sequential
pass over the chunk states — O(L) work, and the decoding state is constant-size: the recurrent state
S [B, H, P, N] plus the last `conv_kernel - 1` convolution inputs [B, conv_dim, conv_kernel - 1]. A one-token call
(decode) uses the recurrent form directly (`recurrent_step`): the same function, other rounding.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm
from .precision import fp32_region, fp32_regions_on


def chunked_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                 state: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan S_t = exp(dt_t a) S_{t-1} + dt_t x_t ⊗ B_t, y_t = S_t C_t, in chunks (fp32).

    Args:
        x: [B, L, H, P]; dt: [B, L, H] (> 0); a: [H] (< 0); b, c: [B, L, N]; state: [B, H, P, N] (S_{-1}).
        chunk: chunk length T (only changes rounding).

    Returns:
        y [B, L, H, P] and the final state [B, H, P, N].
    """
    bsz, length, heads, p = x.shape
    n = b.shape[-1]
    t = max(1, min(chunk, length))
    pad = (-length) % t
    if pad:  # dt = 0 on padding: no decay, no input, so the final state is unchanged by it
        x = nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        dt = nn.functional.pad(dt, (0, 0, 0, pad))
        b = nn.functional.pad(b, (0, 0, 0, pad))
        c = nn.functional.pad(c, (0, 0, 0, pad))
    n_chunks = (length + pad) // t
    xc = x.reshape(bsz, n_chunks, t, heads, p)
    dtc = dt.reshape(bsz, n_chunks, t, heads)
    bc = b.reshape(bsz, n_chunks, t, n)
    cc = c.reshape(bsz, n_chunks, t, n)

    cum = torch.cumsum(dtc * a, dim=2).transpose(2, 3)  # [B, C, H, T], non-increasing along T
    seg = cum[..., :, None] - cum[..., None, :]  # [B, C, H, T(i), T(j)] = log decay from j to i
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    xdt = xc * dtc[..., None]  # [B, C, T, H, P]
    scores = torch.einsum("bcin,bcjn->bcij", cc, bc)  # [B, C, T, T]
    y = torch.einsum("bchij,bcjhp->bcihp", decay * scores[:, :, None], xdt)

    to_end = torch.exp(cum[..., -1:] - cum)  # [B, C, H, T]: decay from each token to its chunk's end
    chunk_states = torch.einsum("bchj,bcjn,bcjhp->bchpn", to_end, bc, xdt)
    chunk_decay = torch.exp(cum[..., -1])  # [B, C, H]
    entering = []
    for i in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, i, :, None, None] * state + chunk_states[:, i]
    entering = torch.stack(entering, dim=1)  # [B, C, H, P, N]: the state before each chunk
    y = y + torch.einsum("bcin,bchpn,bchi->bcihp", cc, entering, torch.exp(cum))
    return y.reshape(bsz, n_chunks * t, heads, p)[:, :length], state


def recurrent_step(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the same scan, in its recurrent form (fp32): S = exp(dt a) S + dt x ⊗ B, y = S C.

    A one-token step needs none of the chunked form's [T × T] machinery (a few kernels instead of ~20, which is what
    a decode step costs on a GPU). Args as `chunked_scan` with L = 1: x [B, 1, H, P]; dt [B, 1, H]; a [H];
    b, c [B, 1, N]; state [B, H, P, N]. Returns y [B, 1, H, P] and the new state [B, H, P, N].
    """
    bsz, _, heads, p = x.shape
    decay = torch.exp(dt[:, 0] * a)[:, :, None, None]  # [B, H, 1, 1]
    state = decay * state + (dt[:, 0, :, None] * x[:, 0])[..., None] * b[:, 0, None, None, :]
    y = torch.bmm(state.reshape(bsz, heads * p, -1), c[:, 0, :, None])  # [B, H·P, 1]
    return y.reshape(bsz, 1, heads, p), state


class Mamba2Mixer(nn.Module):
    """Selective SSM mixer; x [B, L, d_model] -> [B, L, d_model] (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d_in, heads = cfg.d_inner, cfg.ssm_heads
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_in + 2 * cfg.ssm_state + heads, bias=False)
        self.conv = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm = RMSNorm(d_in, cfg.norm_eps)
        self.out_proj = nn.Linear(d_in, cfg.d_model, bias=False)

    @torch.no_grad()
    def reset_ssm_parameters(self, gen: torch.Generator) -> None:
        """Mamba-2 initialisation: A in [1, 16], dt in [1e-3, 1e-1] (log-uniform) through dt_bias."""
        heads = self.cfg.ssm_heads
        self.A_log.copy_(torch.log(1 + 15 * torch.rand(heads, generator=gen)))
        dt = torch.exp(torch.rand(heads, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """x [B, L, d_model]; conv_state [B, conv_dim, conv_kernel-1]; ssm_state [B, H, P, N] (fp32).

        Returns (out [B, L, d_model], new conv_state, new ssm_state); the inputs are not modified.
        """
        cfg = self.cfg
        bsz, length, _ = x.shape
        d_in, n, heads = cfg.d_inner, cfg.ssm_state, cfg.ssm_heads
        z, xbc, dt = torch.split(self.in_proj(x), [d_in, d_in + 2 * n, heads], dim=-1)
        window = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=2)  # [B, conv_dim, K-1+L]
        new_conv_state = window[:, :, -(cfg.conv_kernel - 1):] if cfg.conv_kernel > 1 else conv_state
        in_fp32 = fp32_regions_on(x)  # asked before the region switches autocast off
        with fp32_region(x):
            if in_fp32:  # under autocast: dt's pre-activation and the short conv again in fp32
                dt = nn.functional.linear(x.float(), self.in_proj.weight[-heads:].float())
                window = window.float()
            xbc = nn.functional.silu(nn.functional.conv1d(window, self.conv.weight, self.conv.bias,
                                                          groups=cfg.conv_dim)).transpose(1, 2)
        xs, b, c = torch.split(xbc, [d_in, n, n], dim=-1)
        dt = nn.functional.softplus(dt.float() + self.dt_bias.float())
        a = -torch.exp(self.A_log.float())
        xs = xs.float().reshape(bsz, length, heads, cfg.ssm_head_dim)
        scan = recurrent_step if length == 1 else lambda *args: chunked_scan(*args, cfg.ssm_chunk)
        with fp32_region(x):  # under autocast the scan's products would run in bf16 (`precision`)
            y, new_state = scan(xs, dt, a, b.float(), c.float(), ssm_state.float())
        y = y + self.D.float()[:, None] * xs
        y = self.norm(y.reshape(bsz, length, d_in).to(x.dtype), gate=z)
        return self.out_proj(y), new_conv_state.contiguous(), new_state
