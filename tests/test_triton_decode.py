"""The decode step's kernel variants (kernels/triton/decode.py) against the dense oracle.

`decode.DECODE_BY_HEADS` picks `_decode_heads_kernel` (logits once per query head, shared by its K slots) instead of
`_decode_group_kernel` (one row per (head, slot)); both must give the oracle's output for every K the backend allows
(1-4), batches with left padding, tiny key chunks (spans and the window across chunk edges), KV groups split over
several programs and a head dim that is not a power of two. Without CUDA the kernels run in Triton's CPU interpreter
(fp32/fp16, tiny shapes); the `gpu` test repeats a release-sized step in bf16 on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from helpers import triton_backend_or_skip  # noqa: E402

triton_backend = triton_backend_or_skip()  # before anything imports the kernels

from helpers import assert_close, left_padded_mask, random_inputs  # noqa: E402
from superlinear_kernels import DecodeAttention, SpanConfig, superlinear_attention  # noqa: E402
from superlinear_kernels.triton import decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SMALL = SpanConfig.release().replace(sw_index=5)  # release powers, routing active at interpreter-sized lengths
KERNELS = {"group": False, "heads": True}


def _step(cfg, b, h_q, h_kv, l_kv, d, dtype, position, starts=None, seed=0):
    """(oracle output, triton output, triton routing) of one decode query at `position`."""
    q1, q2, k, v = random_inputs(b, h_q, h_kv, 1, l_kv, d, dtype=dtype, seed=seed, device=DEVICE)
    mask = None if starts is None else left_padded_mask(b, l_kv, starts, device=DEVICE)
    outs = [superlinear_attention(q1, q2, k, v, torch.tensor([position]), cfg, attention_mask=mask, backend=backend,
                                  return_routing=True)
            for backend in ("oracle", "triton")]
    return outs[0][0], outs[1][0], outs[1][1]


def _check(cfg, b, h_q, h_kv, l_kv, d, dtype, position, starts=None, seed=0):
    ref, got, routing = _step(cfg, b, h_q, h_kv, l_kv, d, dtype, position, starts, seed)
    assert (routing.qanchor >= 0).any(), "no routed slot: the case does not exercise the spans"
    assert_close("out", ref.float(), got.float(), OUT_TOL[dtype])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_spans", [1, 2, 3, 4])
def test_decode_every_k(monkeypatch, kernel, num_spans):
    """K = 1..4 slots (the heads kernel keeps one softmax state per slot), batch 2 with a left-padded row; 32-key
    chunks, so a chunk may be needed by one slot's span alone."""
    monkeypatch.setattr(decode, "DECODE_BY_HEADS", KERNELS[kernel])
    monkeypatch.setattr(decode, "decode_chunk_for", lambda l_kv, n_pairs, d: 32)
    cfg = SMALL.replace(num_spans=num_spans)
    _check(cfg, 2, 4, 2, 200, 16, torch.float32, 196, starts=[0, 37])
    _check(cfg, 1, 2, 2, 300, 16, torch.float32, 299, seed=1)  # one head per group: fewer spans share a chunk


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_small_chunks(monkeypatch, kernel, dtype):
    """16-key blocks in 32-key chunks: spans and the window cross chunk edges, a chunk holds a span's end and the
    window's start, most chunks are untouched."""
    monkeypatch.setattr(decode, "DECODE_BY_HEADS", KERNELS[kernel])
    monkeypatch.setattr(decode, "DECODE_BLOCK_N", 16)
    monkeypatch.setattr(decode, "decode_chunk_for", lambda l_kv, n_pairs, d: 32)
    _check(SMALL.replace(sw_index=6), 2, 4, 1, 300, 16, dtype, 290, starts=[0, 31])


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_head_blocks(monkeypatch, kernel):
    """A KV group of 24 heads over programs of 16 heads (heads kernel) or 16 (head, slot) rows (group kernel): the
    last block is part padding; D = 40 pads the tiles to 64."""
    monkeypatch.setattr(decode, "DECODE_BY_HEADS", KERNELS[kernel])
    monkeypatch.setattr(decode, "DECODE_MAX_HEADS", 16)
    monkeypatch.setattr(decode, "DECODE_MAX_ROWS", 16)
    monkeypatch.setattr(decode, "decode_chunk_for", lambda l_kv, n_pairs, d: 64)
    _check(SMALL, 1, 24, 1, 180, 40, torch.float32, 179)


def test_decode_kernels_agree(monkeypatch):
    """Both kernels on the same step: the same partial layout, so the same output up to fp32 rounding."""
    outs = []
    for by_heads in (False, True):
        monkeypatch.setattr(decode, "DECODE_BY_HEADS", by_heads)
        outs.append(_step(SMALL, 1, 8, 2, 260, 16, torch.float32, 250, seed=5)[1])
    assert_close("heads vs group", outs[0].float(), outs[1].float(), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", [*KERNELS, "tma"])
def test_gpu_decode_release_bf16(monkeypatch, kernel):
    """The release layer's shape (16 heads per KV group, D = 128, K = 3) in bf16 at 16K keys, on the GPU; "tma": the
    group kernel reading its whole key blocks through TMA (decode.DECODE_TMA)."""
    monkeypatch.setattr(decode, "DECODE_BY_HEADS", kernel == "heads")
    monkeypatch.setattr(decode, "DECODE_TMA", kernel == "tma")
    if kernel == "tma":
        assert decode.decode_tma(*random_inputs(1, 2, 2, 1, 64, 128, dtype=torch.bfloat16, device=DEVICE)[2:])
    _check(SpanConfig.release(), 1, 32, 2, 16384, 128, torch.bfloat16, 16383, seed=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_decode_pdl_graph_bit_identical(monkeypatch, kernel):
    """decode.DECODE_PDL (the step's kernels with programmatic dependent launch): DecodeAttention's graph replays
    and direct launches give the bits of the same step without PDL, position after position (a kernel reading its
    predecessor's output before it is written would show here)."""
    monkeypatch.setattr(decode, "DECODE_BY_HEADS", KERNELS[kernel])
    cfg = SpanConfig.release()
    q1, q2, k, v = random_inputs(1, 32, 2, 1, 65536, 128, dtype=torch.bfloat16, seed=3, device=DEVICE)
    outs = {}
    for pdl in (False, True):
        monkeypatch.setattr(decode, "DECODE_PDL", pdl)
        graph = DecodeAttention(k, v, cfg, num_heads=32, backend="triton")
        direct = DecodeAttention(k, v, cfg, num_heads=32, backend="triton", graph=False)
        rows = []
        for step, position in enumerate((65535, 40000, 65535, 9000, 30000, 65000)):
            qa, qb = q1 * (1 + step / 8), q2 * (1 - step / 16)
            rows.append((graph(qa, qb, position).clone(), direct(qa, qb, position).clone()))
        assert graph.use_graph and graph._graph is not None, "the step was not captured as a graph"
        outs[pdl] = rows
    for (g0, d0), (g1, d1) in zip(outs[False], outs[True]):
        assert torch.equal(g0, d0) and torch.equal(g1, g0) and torch.equal(d1, d0)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_tma_bit_identical(monkeypatch):
    """decode.DECODE_TMA (the group kernel's whole key blocks through TMA, its last partial block masked): graph replays
    and direct launches give the bits of the masked loads, position after position (runs ending mid-block, chunks cut
    by the position). The cache holds NaN from key 59,990 on, inside the key block of positions 59,985 and 59,989:
    keys past the position may hold anything, and a step must not read them."""
    monkeypatch.setattr(decode, "DECODE_BY_HEADS", False)
    cfg = SpanConfig.release()
    q1, q2, k, v = random_inputs(1, 32, 2, 1, 65536, 128, dtype=torch.bfloat16, seed=4, device=DEVICE)
    k[:, :, 59990:] = float("nan")
    v[:, :, 59990:] = float("nan")
    outs = {}
    for tma in (False, True):
        monkeypatch.setattr(decode, "DECODE_TMA", tma)
        assert decode.decode_tma(k, v) == tma
        graph = DecodeAttention(k, v, cfg, num_heads=32, backend="triton")
        direct = DecodeAttention(k, v, cfg, num_heads=32, backend="triton", graph=False)
        rows = []
        for step, position in enumerate((59985, 40001, 59989, 9000, 30017, 1000)):
            qa, qb = q1 * (1 + step / 8), q2 * (1 - step / 16)
            rows.append((graph(qa, qb, position).clone(), direct(qa, qb, position).clone()))
        assert graph.use_graph and graph._graph is not None, "the step was not captured as a graph"
        outs[tma] = rows
    for position, (g0, d0), (g1, d1) in zip((59985, 40001, 59989, 9000, 30017, 1000), outs[False], outs[True]):
        assert torch.isfinite(d0).all(), f"position {position}: the masked loads gave non-finite rows"
        assert torch.equal(g0, d0) and torch.equal(g1, g0) and torch.equal(d1, d0), f"position {position}"
