"""Device-side forms of the geometry rules, for the kernels (which cannot call the torch functions).

`window_lo` is `superlinear_kernels.geometry.window_bounds`'s lower bound, max(q - W + 1, s, 0) (docs/algorithm.md §1.5);
the kernels handle W = 0 (no window) themselves, as window_bounds does with its -1 bounds.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def window_lo(pos, s, W):
    """First window key of query position `pos` in a row starting at `s`: max(pos - W + 1, s, 0).
    With s = 0 it is sw_start(pos), after which no span may end (docs/algorithm.md §1.7)."""
    return tl.maximum(tl.maximum(pos - W + 1, s), 0)
