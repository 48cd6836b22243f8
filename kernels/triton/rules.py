"""Device-side forms of the rules, for the kernels (which cannot call the torch functions).

`window_lo` is `superlinear_kernels.geometry.window_bounds`'s lower bound, max(q - W + 1, s, 0) (docs/algorithm.md §1.5);
the kernels handle W = 0 (no window) themselves, as window_bounds does with its -1 bounds. `nonfinite_rows` is the
API's non-finite rule (`api._nan_rows`) for kernels that write the layer's output themselves. LOG2E and LN2 convert
between the natural-log softmax statistics the kernels store and the base-2 (exp2) form they compute in.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def window_lo(pos, s, W):
    """First window key of query position `pos` in a row starting at `s`: max(pos - W + 1, s, 0).
    With s = 0 it is sw_start(pos), after which no span may end (docs/algorithm.md §1.7)."""
    return tl.maximum(tl.maximum(pos - W + 1, s), 0)


LOG2E = tl.constexpr(1.4426950408889634)  # logits in base 2: scale·log2(e) is one multiply
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def nonfinite_rows(x, mask, AXIS: tl.constexpr):
    """Which rows of x (fp32, already rounded to the output dtype) hold a non-finite component under `mask`,
    reducing along AXIS: those rows are written as NaN in full (the API's rule, `api._nan_rows`)."""
    return tl.max(tl.where(mask & ~((x == x) & (tl.abs(x) < float("inf"))), 1, 0), axis=AXIS) > 0
