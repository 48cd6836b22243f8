"""The single-query path of `superlinear_attention` on the Triton backend and the decode group kernel's worklist grid.

Like tests/test_triton.py, the kernels run in Triton's CPU interpreter without CUDA (TRITON_INTERPRET=1 is set here,
before `superlinear_kernels.triton` is first imported); fp32 and fp16 only, tiny shapes. The CUDA-graph replay of the
same path is checked by the `gpu` tests at the end (bit-identical to the direct launches).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton_backend = pytest.importorskip("superlinear_kernels.triton")

from helpers import assert_close, random_inputs  # noqa: E402
from superlinear_kernels import DecodeAttention, SpanConfig, superlinear_attention  # noqa: E402
from superlinear_kernels import api  # noqa: E402

if not triton_backend.available():
    pytest.skip("Triton kernels cannot run here (no CUDA and not defined under TRITON_INTERPRET=1)",
                allow_module_level=True)

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
    """Bad inputs raise the same error, with the same message, on the single-query path as on the general path."""
    q1, q2, k, v = random_inputs(1, 4, 2, 1, 50, 16, seed=1, device=DEVICE)
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
    assert caches[0][2].data_ptr() not in {key[1] for key in api._RUNNERS}, "the least recently used runner stays"
    q1, q2, k, v = (x.clone().requires_grad_() for x in caches[1])
    out = superlinear_attention(q1, q2, k, v, [39], CFG, backend="triton")
    out.sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()
    assert api._RUNNERS[next(key for key in api._RUNNERS if key[1] == caches[1][2].data_ptr())].calls == 1


def _naive_step(q2, k, v, qstart, qend, values, valid, pos, window):
    """Reference for one decode step over a given routing: per (batch, head, slot) a softmax over the span's keys and
    the window's, then the gate softmax(values) (an invalid slot's logit -1e9) — written out, sharing nothing."""
    b, h_q, _, d = q2.shape
    group = h_q // k.shape[1]
    out = torch.zeros(b, h_q, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(h_q):
            kk = k[bi, h // group].double()
            vv = v[bi, h // group].double()
            q = q2[bi, h, 0].double()
            logits = [float(values[bi, h, 0, s]) if valid[bi, h, 0, s] else -1e9 for s in range(qstart.shape[-1])]
            top = max(logits)
            gates = [math.exp(x - top) for x in logits]
            total = sum(gates)
            for s, g in enumerate(gates):
                keys = set(range(max(pos - window + 1, 0), pos + 1))
                if valid[bi, h, 0, s]:
                    keys |= set(range(int(qstart[bi, h, 0, s]), int(qend[bi, h, 0, s]) + 1))
                idx = torch.tensor(sorted(keys))
                p = torch.softmax(kk[idx] @ q / math.sqrt(d), dim=0)
                out[bi, h] += g / total * (p @ vv[idx])
    return out


def test_worklist_grid_bound_is_reached(monkeypatch):
    """Spans of the largest length, each starting one key before a chunk ends, in disjoint chunks, and a window
    likewise: the step needs exactly `work_programs` chunks. The output matches a naive reference, so a grid that
    is one program short, or a program that skips or repeats a chunk, fails."""
    from superlinear_kernels.triton import decode

    chunk, max_len, window, l_kv, pos = 16, 40, 20, 520, 498
    monkeypatch.setattr(decode, "DECODE_BLOCK_N", 16)
    monkeypatch.setattr(decode, "decode_chunk_for", lambda l_kv, n_pairs, d: chunk)
    b, h_q, h_kv, d, n_spans = 1, 2, 1, 16, 3
    gen = torch.Generator().manual_seed(7)
    q2 = torch.randn(b, h_q, 1, d, generator=gen)
    k = torch.randn(b, h_kv, l_kv, d, generator=gen)
    v = torch.randn(b, h_kv, l_kv, d, generator=gen)
    values = torch.randn(b, h_q, 1, n_spans, generator=gen)
    row = torch.arange(h_q * n_spans).reshape(1, h_q, 1, n_spans)
    qstart = (80 * row + chunk - 1).to(torch.int32)  # row j: keys 80j + 15 ... 80j + 54, chunks 5j ... 5j + 3
    qend = qstart + max_len - 1
    qanchor = qend.clone()
    needed = h_q * n_spans * 4 + 3  # 4 chunks per span, the window's keys 479..498 in chunks 29, 30 and 31
    assert decode.work_programs(-(-l_kv // chunk), chunk, h_q * n_spans, max_len, window) == needed
    positions = torch.tensor([pos])
    starts = torch.zeros(b, dtype=torch.int64)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    out, *_ = decode.decode_forward(dev(q2), dev(k), dev(v), dev(qstart), dev(qend), dev(qanchor), dev(values),
                                    dev(positions), dev(starts), window, max_len)
    ref = _naive_step(q2, k, v, qstart, qend, values, qanchor >= 0, pos, window)
    assert_close("out", ref.float(), out[:, :, 0].float().cpu(), 1e-4)


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
