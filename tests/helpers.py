"""Shared test helpers: one relative-error comparison that names what it compares, random inputs."""
from __future__ import annotations

import torch


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |ref - got| / max(max |ref|, tiny), computed in float64."""
    ref64, got64 = ref.detach().double(), got.detach().double()
    if ref64.numel() == 0:
        return 0.0
    scale = ref64.abs().max().clamp_min(1e-12)
    return float((ref64 - got64).abs().max() / scale)


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    """Fail with a readable message when the relative error of `got` against `ref` exceeds `tol`."""
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_err(ref, got)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def random_inputs(b, h_q, h_kv, l_q, l_kv, d, dtype=torch.float32, seed=0, device="cpu"):
    """(q1, q2, k, v) with q1 [B, H_Q, L_Q, D] and k/v [B, H_KV, L_KV, D]."""
    gen = torch.Generator().manual_seed(seed)
    q1 = torch.randn(b, h_q, l_q, d, generator=gen)
    q2 = torch.randn(b, h_q, l_q, d, generator=gen)
    k = torch.randn(b, h_kv, l_kv, d, generator=gen)
    v = torch.randn(b, h_kv, l_kv, d, generator=gen)
    return tuple(x.to(device=device, dtype=dtype) for x in (q1, q2, k, v))


def left_padded_mask(b, l_kv, starts, device="cpu"):
    """bool [B, L_KV] with row r valid from starts[r] on."""
    keys = torch.arange(l_kv, device=device)
    return keys[None, :] >= torch.tensor(starts, device=device)[:, None]
