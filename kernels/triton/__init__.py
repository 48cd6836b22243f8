"""Triton kernels of Superlinear attention: search, window, span (bucketed prefill / per-pair decode),
gate, and their backward. Selected by `backend="triton"` (and "auto" on CUDA tensors).

`available()` is True when Triton imports and either CUDA is present or the kernels were defined
under `TRITON_INTERPRET=1` (the CPU interpreter used by the tests; set it before this import).
"""
from __future__ import annotations

from .common import INTERPRET

try:
    import triton  # noqa: F401

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - Triton is a Linux dependency
    _HAVE_TRITON = False

if _HAVE_TRITON:
    from .ops import span_search, superlinear_attention

__all__ = ["available", "span_search", "superlinear_attention"]


def available() -> bool:
    """Can the Triton kernels run here (CUDA, or the interpreter)?"""
    if not _HAVE_TRITON:
        return False
    if INTERPRET:
        return True
    import torch

    return torch.cuda.is_available()
