"""Shared test helpers: one relative-error comparison that names what it compares, random inputs."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

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


def triton_backend_or_skip():
    """`superlinear_kernels.triton` for a test module, skipping the module where its kernels cannot run.

    Without CUDA the kernels run in Triton's CPU interpreter, which must be switched on before they are defined:
    TRITON_INTERPRET=1 is set here, before the package is first imported (call this at the top of the module,
    before anything imports `superlinear_kernels.triton`).
    """
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    backend = pytest.importorskip("superlinear_kernels.triton")
    if not backend.available():
        pytest.skip("Triton kernels cannot run here (no CUDA and not defined under TRITON_INTERPRET=1)",
                    allow_module_level=True)
    return backend


def load_bench(name: str):
    """Import the script bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
