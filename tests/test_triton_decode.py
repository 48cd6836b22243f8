"""The decode step's kernel variants (kernels/triton/decode.py) against the dense oracle.

`decode.DECODE_BY_HEADS` picks `_decode_heads_kernel` (logits once per query head, shared by its K slots) instead of
`_decode_group_kernel` (one row per (head, slot)); both must give the oracle's output for every K the backend allows
(1-4), batches with left padding, tiny key chunks (spans and the window across chunk edges), KV groups split over
several programs and a head dim that is not a power of two. Without CUDA the kernels run in Triton's CPU interpreter
(fp32/fp16, tiny shapes); the `gpu` test repeats a release-sized step in bf16 on CUDA.

`common.tma_descriptors` keeps the K/V TMA descriptor pair per cache layout (a decoding loop launched from Python
builds it once): CPU tests with `tma_ok` patched check reuse, that a descriptor never outlives its cache's layout and
that the cache is bounded and keeps no tensor alive. The `gpu` bit tests check that switches which must not change a
step's bits (PDL, TMA, the descriptor cache) do not, for graph replays and direct launches alike.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from helpers import triton_backend_or_skip  # noqa: E402

triton_backend = triton_backend_or_skip()  # before anything imports the kernels

from helpers import assert_close, left_padded_mask, random_inputs  # noqa: E402
from superlinear_kernels import DecodeAttention, SpanConfig, superlinear_attention  # noqa: E402
from superlinear_kernels.triton import common, decode  # noqa: E402

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


def _count_builds(monkeypatch) -> list:
    """Every TensorDescriptor `common.tma_descriptors` builds from now on (within the test), in a list."""
    built = []
    real = common.TensorDescriptor

    def counting(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(common, "TensorDescriptor", counting)
    return built


@pytest.fixture
def descriptor_builds(monkeypatch):
    """`common.tma_descriptors` on the CPU: caches that pass `tma_ok` (patched), an empty descriptor cache, and the
    list of every TensorDescriptor built."""
    monkeypatch.setattr(common, "tma_ok", lambda k, v: True)
    monkeypatch.setattr(common, "_TMA_CACHE", {})
    return _count_builds(monkeypatch)


def _described(desc, x: torch.Tensor, block_n: int, block_d: int) -> bool:
    """Whether a descriptor describes tensor x now: its address, dtype, shape and strides, and the block."""
    return (desc.base.data_ptr() == x.data_ptr() and desc.base.dtype == x.dtype and list(desc.shape) == list(x.shape)
            and list(desc.strides) == list(x.stride()) and list(desc.block_shape) == [1, 1, block_n, block_d])


def test_tma_descriptors_reused(descriptor_builds):
    """Repeated calls over the same caches (a decoding loop launched from Python) build the K and V descriptors once
    and return the same objects; another block or a disabled switch builds anew."""
    k, v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    first = common.tma_descriptors(k, v, 32, 16, True)
    assert first[2] and _described(first[0], k, 32, 16) and _described(first[1], v, 32, 16)
    for _ in range(5):
        again = common.tma_descriptors(k, v, 32, 16, True)
        assert again[0] is first[0] and again[1] is first[1] and again[2]
    assert len(descriptor_builds) == 2
    other = common.tma_descriptors(k, v, 16, 16, True)
    assert _described(other[0], k, 16, 16) and len(descriptor_builds) == 4
    assert common.tma_descriptors(k, v, 32, 16, False) == (None, None, False) and len(descriptor_builds) == 4


def test_tma_descriptors_follow_the_cache(descriptor_builds):
    """A descriptor is never stale: a view of a cache's first keys (same address and strides), a cache (K, or V
    alone) replaced by a new tensor (same shape), grown (a new tensor, or the same tensor object resized in place),
    moved to new storage in place, viewed with other strides or another dtype at the same address gets descriptors
    of what it is now."""
    k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    common.tma_descriptors(k, v, 32, 16, True)
    cases = {
        "a view of its first keys": lambda k, v: (k[:, :, :32], v[:, :, :32]),
        "K replaced": lambda k, v: (torch.randn(1, 2, 64, 16), v),
        "V replaced alone": lambda k, v: (k, torch.randn(1, 2, 64, 16)),
        "grown": lambda k, v: (torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)),
        "resized in place": lambda k, v: (k.resize_(1, 2, 256, 16), v.resize_(1, 2, 256, 16)),
        "new storage in place": lambda k, v: (k.set_(torch.randn(1, 2, 256, 16)), v),
        "other strides": lambda k, v: (k.as_strided(k.shape, (k.stride(0), 512, 16, 1)), v),
        "other dtype": lambda k, v: (k.view(torch.int32), v.view(torch.int32)),
    }
    for name, change in cases.items():
        k, v = change(k, v)
        kd, vd, tma = common.tma_descriptors(k, v, 32, 16, True)
        assert tma and _described(kd, k, 32, 16) and _described(vd, v, 32, 16), name


def test_tma_descriptors_bounded(descriptor_builds, monkeypatch):
    """At most TMA_DESC_CACHE pairs are kept (the oldest goes first); 0 builds both descriptors on every call. A kept
    descriptor does not keep its cache's memory alive."""
    monkeypatch.setattr(common, "TMA_DESC_CACHE", 3)
    caches = [(torch.randn(1, 1, 32, 16), torch.randn(1, 1, 32, 16)) for _ in range(5)]
    for k, v in caches:
        common.tma_descriptors(k, v, 32, 16, True)
    assert len(common._TMA_CACHE) == 3 and len(descriptor_builds) == 10
    common.tma_descriptors(*caches[-1], 32, 16, True)
    common.tma_descriptors(*caches[0], 32, 16, True)  # evicted: built again
    assert len(descriptor_builds) == 12 and len(common._TMA_CACHE) == 3
    monkeypatch.setattr(common, "TMA_DESC_CACHE", 0)
    for _ in range(3):
        common.tma_descriptors(*caches[-1], 32, 16, True)
    assert len(descriptor_builds) == 18
    monkeypatch.setattr(common, "TMA_DESC_CACHE", 64)
    k = torch.randn(1, 1, 1024, 16)
    gone = weakref.ref(k)
    common.tma_descriptors(k, caches[0][1], 32, 16, True)
    del k
    gc.collect()
    assert gone() is None, "a kept descriptor holds its cache tensor"


# The GPU bit tests: a switch that must not change a step's bits, off then on, over the same steps; per value, the
# rows of DecodeAttention's graph replays and direct launches (and, "cache", direct launches over a second cache of
# the same layout at another address, alternating with the first).
BIT_CASES = {
    # decode.DECODE_PDL (the step's kernels with programmatic dependent launch): a kernel reading its predecessor's
    # output before it is written would show here.
    "pdl-group": dict(switch=(decode, "DECODE_PDL", False, True), by_heads=False, seed=3, nan_from=None,
                      positions=(65535, 40000, 65535, 9000, 30000, 65000)),
    "pdl-heads": dict(switch=(decode, "DECODE_PDL", False, True), by_heads=True, seed=3, nan_from=None,
                      positions=(65535, 40000, 65535, 9000, 30000, 65000)),
    # decode.DECODE_TMA (the group kernel's whole key blocks through TMA, its last partial block masked): runs ending
    # mid-block, chunks cut by the position. The cache holds NaN from key 59,990 on, inside the key block of positions
    # 59,985 and 59,989: keys past the position may hold anything, and a step must not read them.
    "tma": dict(switch=(decode, "DECODE_TMA", False, True), by_heads=False, seed=4, nan_from=59990,
                positions=(59985, 40001, 59989, 9000, 30017, 1000)),
    # common.TMA_DESC_CACHE (descriptors built once per cache layout, not per launch; TMA on): the kept descriptors
    # give the bits of descriptors built at every launch, for either cache.
    "cache": dict(switch=(common, "TMA_DESC_CACHE", 0, 64), by_heads=False, seed=5, nan_from=59990,
                  positions=(59985, 40001, 59989, 9000, 30017, 1000)),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", BIT_CASES)
def test_gpu_decode_switch_bit_identical(monkeypatch, case):
    """Graph replays and direct launches give the same bits with the switch off and on, position after position,
    and no row is non-finite (a step reading keys past its position would be NaN)."""
    spec = BIT_CASES[case]
    module, name, off, on = spec["switch"]
    monkeypatch.setattr(common, "_TMA_CACHE", {})
    built = _count_builds(monkeypatch)
    monkeypatch.setattr(decode, "DECODE_BY_HEADS", spec["by_heads"])
    cfg = SpanConfig.release()
    q1, q2, k, v = random_inputs(1, 32, 2, 1, 65536, 128, dtype=torch.bfloat16, seed=spec["seed"], device=DEVICE)
    k2, v2 = k.flip(2), v.roll(1000, dims=2)
    if spec["nan_from"] is not None:
        for x in (k, v, k2, v2):
            x[:, :, spec["nan_from"]:] = float("nan")
    outs = {}
    for value in (off, on):
        monkeypatch.setattr(module, name, value)
        built.clear()
        if name == "DECODE_TMA":
            assert decode.decode_tma(k, v) == value
        graph = DecodeAttention(k, v, cfg, num_heads=32, backend="triton")
        direct = DecodeAttention(k, v, cfg, num_heads=32, backend="triton", graph=False)
        other = DecodeAttention(k2, v2, cfg, num_heads=32, backend="triton", graph=False) if case == "cache" else None
        rows = []
        for step, position in enumerate(spec["positions"]):
            qa, qb = q1 * (1 + step / 8), q2 * (1 - step / 16)
            row = (graph(qa, qb, position).clone(), direct(qa, qb, position).clone())
            rows.append(row + ((other(qa, qb, position).clone(),) if other else ()))
        assert graph.use_graph and graph._graph is not None, "the step was not captured as a graph"
        outs[value] = rows
    for position, row_off, row_on in zip(spec["positions"], outs[off], outs[on]):
        assert all(torch.isfinite(x).all() for x in row_off), f"position {position}: non-finite rows"
        assert torch.equal(row_off[0], row_off[1]) and all(map(torch.equal, row_off, row_on)), f"position {position}"
    if case == "cache":  # (built: the switch on's descriptors)
        assert decode.decode_tma(k, v) and len(built) == 4 and len(common._TMA_CACHE) == 2, "one pair per cache"
