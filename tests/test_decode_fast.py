"""The single-query path of `superlinear_attention` on the Triton backend (no host synchronisation, one runner per
cache layout, a CUDA-graph replay from the second call on CUDA).

Like tests/test_triton.py, the kernels run in Triton's CPU interpreter without CUDA (TRITON_INTERPRET=1 is set here,
before `superlinear_kernels.triton` is first imported); fp32 and fp16 only, tiny shapes. The CUDA-graph replay of the
same path is checked by the `gpu` tests at the end (bit-identical to the direct launches).
"""
from __future__ import annotations

import pytest
import torch

from helpers import triton_backend_or_skip  # noqa: E402

triton_backend = triton_backend_or_skip()  # before anything imports the kernels

from helpers import assert_close, random_inputs  # noqa: E402
from superlinear_kernels import DecodeAttention, SpanConfig, superlinear_attention  # noqa: E402
from superlinear_kernels import api  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = SpanConfig.release().replace(sw_index=5)  # release powers, a window small enough for routing at L = 300


def _general(q1, q2, k, v, position, cfg):
    """The general path of the public call (return_routing=True never takes the single-query path)."""
    return superlinear_attention(q1, q2, k, v, position, cfg, backend="triton", return_routing=True)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_single_step_equals_general_path_entry_and_oracle(dtype):
    """One query: the single-query path gives the general path's bits and DecodeAttention's, for a position given as
    a list, an int tensor or (on the device) a device tensor, and matches the oracle; it keeps one runner per cache."""
    api._RUNNERS.clear()
    q1, q2, k, v = random_inputs(2, 8, 2, 1, 300, 16, dtype=dtype, seed=3, device=DEVICE)
    entry = DecodeAttention(k, v, CFG, num_heads=8, backend="triton")
    for p in (299, 181, 40, 7):
        ref = _general(q1, q2, k, v, [p], CFG)
        for position in ([p], torch.tensor([p], dtype=torch.int32), torch.tensor([p], device=DEVICE)):
            out = superlinear_attention(q1, q2, k, v, position, CFG, backend="triton")
            assert torch.equal(out, ref), f"position {position!r}: single-query path differs from the general path"
        assert torch.equal(entry(q1, q2, p), ref)
        oracle = superlinear_attention(q1, q2, k, v, [p], CFG, backend="oracle")
        assert_close(f"out at {p}", oracle.float(), ref.float(), 1e-4 if dtype == torch.float32 else 5e-3)
    (runner,) = api._RUNNERS.values()  # the path was taken, once per call, with one runner for the one cache
    assert runner.calls == 12


@pytest.mark.parametrize("case", ["range", "negative", "cpu-tensor-range", "float-position", "two-positions",
                                  "q2-dtype", "v-shape", "gqa", "cfg"])
def test_single_step_errors_are_the_general_paths(case):
    """Bad inputs raise the same error, with the same message, on the single-query path as on the general path —
    also right after a good call with the same cache (whose runner then exists: its key must not let them pass)."""
    q1, q2, k, v = random_inputs(1, 4, 2, 1, 50, 16, seed=1, device=DEVICE)
    superlinear_attention(q1, q2, k, v, [49], CFG, backend="triton")
    position, cfg = [49], CFG
    if case == "range":
        position = [50]
    elif case == "negative":
        position = [-1]
    elif case == "cpu-tensor-range":
        position = torch.tensor([60])
    elif case == "float-position":
        position = [3.0]
    elif case == "two-positions":
        position = [3, 4]
    elif case == "q2-dtype":
        q2 = q2.half()
    elif case == "v-shape":
        v = v[:, :, :40]
    elif case == "gqa":
        k, v = k[:, :1].expand(1, 3, 50, 16), v[:, :1].expand(1, 3, 50, 16)
    elif case == "cfg":
        cfg = {"window": 5}
    with pytest.raises((TypeError, ValueError)) as general:
        superlinear_attention(q1, q2, k, v, position, cfg, backend="triton", return_routing=True)
    with pytest.raises(general.type) as fast:
        superlinear_attention(q1, q2, k, v, position, cfg, backend="triton")
    assert str(fast.value) == str(general.value)


def test_device_position_outside_the_cache_gives_nan_rows():
    """A position held on the device is not read on the host: outside [0, L_KV) the step must read nothing past the
    cache or its tables and return NaN in every row (never a finite number)."""
    from superlinear_kernels.triton import ops

    q1, q2, k, v = random_inputs(2, 8, 2, 1, 300, 16, seed=5, device=DEVICE)
    plan = ops.decode_plan(q1, k, v, CFG)
    starts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    for bad in (300, 301, 10**6, -1):
        out = ops.decode_attention(q1, q2, k, v, CFG, torch.tensor([bad], device=DEVICE), starts, plan)
        assert torch.isnan(out).all(), f"position {bad}: {int((~torch.isnan(out)).sum())} values are not NaN"
    good = ops.decode_attention(q1, q2, k, v, CFG, torch.tensor([299], device=DEVICE), starts, plan)
    assert torch.isfinite(good).all()


def test_runners_are_bounded_and_gradients_take_the_general_path(monkeypatch):
    monkeypatch.setattr(api, "_MAX_RUNNERS", 2)
    api._RUNNERS.clear()
    caches = [random_inputs(1, 4, 2, 1, 40, 16, seed=s, device=DEVICE) for s in range(3)]
    for q1, q2, k, v in caches:
        superlinear_attention(q1, q2, k, v, [39], CFG, backend="triton")
    assert len(api._RUNNERS) == 2
    assert not any(caches[0][2].data_ptr() in key for key in api._RUNNERS), "the least recently used runner stays"
    q1, q2, k, v = (x.clone().requires_grad_() for x in caches[1])
    out = superlinear_attention(q1, q2, k, v, [39], CFG, backend="triton")
    out.sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()
    assert len(api._RUNNERS) == 2, "a call that needs gradients makes no runner"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_single_step_replays_a_graph_with_the_same_bits():
    """On CUDA the second call with one cache replays a captured graph: same bits as the general path at every
    position, positions given as a list or a device tensor, and after the cache's contents change."""
    api._RUNNERS.clear()
    cfg = SpanConfig.release()
    q1, q2, k, v = random_inputs(1, 32, 2, 1, 70_000, 128, dtype=torch.bfloat16, seed=2, device="cuda")
    for p in (69_999, 69_999, 50_000, 4_095, 12):
        ref = _general(q1, q2, k, v, [p], cfg)
        assert torch.equal(superlinear_attention(q1, q2, k, v, [p], cfg), ref)
        assert torch.equal(superlinear_attention(q1, q2, k, v, torch.tensor([p], device="cuda"), cfg), ref)
    (runner,) = api._RUNNERS.values()
    assert runner._graph is not None
    k[:, :, 60_000:] = torch.randn_like(k[:, :, 60_000:])
    assert torch.equal(superlinear_attention(q1, q2, k, v, [69_999], cfg), _general(q1, q2, k, v, [69_999], cfg))
    out = superlinear_attention(q1, q2, k, v, torch.tensor([70_000], device="cuda"), cfg)
    assert torch.isnan(out).all()
