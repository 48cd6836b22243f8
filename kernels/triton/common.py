"""Shared pieces of the Triton backend: block-size choices, the geometry tables as device tensors,
and the row layout that puts the query heads of one KV group into one program.

Row layout (window kernels): a program owns one (batch, KV head, head chunk) and a block of BQ
query indices; its BLOCK_M = GH * BQ rows are (head g in the chunk) x (query in the block),
row r -> g = r // BQ, query = r % BQ. All heads of a KV group then share each K/V tile in one tl.dot.
(The search keeps a 3-D [heads, queries, D] tile instead, see search.py.)
"""
from __future__ import annotations

import os

import torch
import triton

from ..config import SpanConfig
from ..geometry import span_lengths, stripe_table

# Read once, when the backend is first imported: Triton decides at kernel-definition time whether a
# kernel runs compiled (CUDA) or in its CPU interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_SPANS = 4  # docs/algorithm.md §1.2: fast kernels support K <= 4 (the kernels take any K; this is the tested, tuned range)
MAX_HEAD_DIM = 256  # docs/algorithm.md §1.2: fast kernels support D <= 256
TARGET_ROWS = 64  # rows per program in the window kernels
MAX_HEAD_CHUNK = 64  # a KV group with more query heads is split into chunks of this many heads
# Training (inputs that need grad) over more queries than this runs the dQ2 backward in chunks of this many queries
# (the fp32 dQ2 accumulator exists for one chunk at a time), and the branches' forward in chunks of at most this many.
TRAIN_CHUNK = 16384
# The training forward's chunks (`train_forward_chunk`): about L_Q / TRAIN_FWD_PARTS queries, at least
# TRAIN_FWD_MIN_ROWS query rows (B·H_Q per query: 2048 queries of the 32-head release layer), at most TRAIN_CHUNK.
# A chunk's fp32 window and branch outputs (K + 1 times its rows of q2, in fp32) are the forward's scratch, so it stays
# a small part of what training keeps (K + 1 times q2 in q2's dtype, with residuals).
# H200, session 8 window A (forward by heads): 8 parts instead of 16 took the 32K forward from 12.7-13.3 to 11.4 ms
# (host time 13-14 -> 7.3 ms), step 32K 55.5-60.0 -> 53.9 ms, 128K 293-295 -> 291 ms; peak 128K 5.64 -> 5.81 GB, 64K
# 2.82 -> 2.91 GB (dense: 6.61, 3.31). 4 parts: 32K peak 1.75 GB, above dense's 1.65.
TRAIN_FWD_PARTS = 8
TRAIN_FWD_MIN_ROWS = 65536
# The chunks taken as a few query heads of one batch row over all queries (`train_forward_heads`, at most a chunk's
# rows) instead of all heads over a range of queries: a chunk is then a contiguous slice of q2, the routing and the
# outputs, so it copies nothing in and out. Query chunks remain where one head over all queries holds more rows
# than a chunk (from 512K queries of the 32-head release layer). H200 (session 7): forward 2–8% faster at 16K–128K.
TRAIN_FWD_BY_HEADS = True
# Training keeps R_k = O_k − O (K × q2's size) for the gate and Δ gradients, and the first backward frees them once the
# gate backward has read them; False: the backward recomputes dO·O_k from the stored lse instead (grad.branch_dots: one
# more pass over the window and the spans, K × q2's size less memory). A second backward through the same graph
# (retain_graph=True) recomputes too.
KEEP_RESIDUALS = True
# Memory order of the backward's gradient atomics (the span dQ tiles' adds, the search backward's dK scatter): pure
# sums, read only after the kernel ends, so "relaxed" (plain RED on sm_90). Triton's default "acq_rel" wraps each
# atomic in MEMBAR.ALL.GPU + ERRBAR + CCTL.IVALL (sm_90 SASS, Triton 3.6).
GRAD_ATOMIC_SEM = "relaxed"


try:  # host TMA descriptors (Triton >= 3.3); without them no kernel takes its TMA path (`tma_ok`)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# Most (K, V) descriptor pairs `tma_descriptors` keeps (0: build both on every call): a launch from Python otherwise
# builds them anew each time. H200, session 11 window D (host busy): a kept pair costs 3.9 us per call, building it
# 23-25 us; eager DecodeAttention(graph=False) 1M 0.602 -> 0.556 ms, 128K 0.427 -> 0.411 (without TMA 0.487 / 0.367:
# Triton 3.6's launcher still encodes both tensor maps and rebuilds its argument list at every launch).
TMA_DESC_CACHE = 64


def tma_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether K and V caches can be read through TMA host descriptors: compiled kernels (not the interpreter) on a
    CUDA device of compute capability >= 9.0, a Triton with tensor descriptors, 16-byte aligned bases and strides and
    unit stride over D."""
    if INTERPRET or TensorDescriptor is None or k.device.type != "cuda" \
            or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    return all(x.data_ptr() % 16 == 0 and x.stride(-1) == 1 and all(st * x.element_size() % 16 == 0
                                                                     for st in x.stride()[:-1]) for x in (k, v))


_SM_COUNT: dict = {}  # CUDA device index -> its SM count (`sm_count`)


def sm_count(device) -> int:
    """The streaming multiprocessors of a CUDA device, asked of the driver once per device and kept (launchers call
    this on every step)."""
    device = torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


class _DescriptorBase:
    """What a launch reads of a descriptor's base: the address and the element type (Triton's launcher encodes the
    TMA map from the base's data_ptr() and the descriptor's shape and strides at each launch). A cached descriptor
    holds this, not the tensor, so it never keeps a freed cache's memory alive; the interpreter cannot read it (it
    copies a descriptor's base tensor), but the interpreter never takes the TMA path (`tma_ok`)."""
    __slots__ = ("_ptr", "dtype")

    def __init__(self, x: torch.Tensor):
        self._ptr, self.dtype = x.data_ptr(), x.dtype

    def data_ptr(self) -> int:
        return self._ptr


_TMA_CACHE: dict = {}  # `_tma_key` -> (k_desc, v_desc), oldest first


def _tma_key(k: torch.Tensor, v: torch.Tensor, block_n: int, block_d: int) -> tuple:
    """Everything a descriptor pair is made of: each tensor's address, shape, strides, dtype and device, and the
    block. A cache reallocated, grown (in place or not) or viewed differently gives another key; a new tensor at a
    freed one's address with the same layout gives the same key, and the same descriptors are right for it."""
    return (k.data_ptr(), k.shape, k.stride(), k.dtype, k.device, v.data_ptr(), v.shape, v.stride(), v.dtype,
            v.device, block_n, block_d)


def tma_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, block_d: int, use: bool):
    """(k_desc, v_desc, tma) for kernels that read whole key blocks through TMA (window/span forwards, decode):
    host TMA descriptors of K and V [B, H_KV, L_KV, D] with blocks [1, 1, block_n, block_d] when `use` and the device
    and caches allow it (`tma_ok`), else (None, None, False). The pairs of the last TMA_DESC_CACHE layouts are kept
    and returned again for the same layout (`_tma_key`), so a decoding loop launched from Python builds them once."""
    if not use:
        return None, None, False
    key = _tma_key(k, v, block_n, block_d) if TMA_DESC_CACHE else None
    pair = _TMA_CACHE.get(key)
    if pair is None:
        if not tma_ok(k, v):
            return None, None, False
        pair = tuple(TensorDescriptor(_DescriptorBase(x), list(x.shape), list(x.stride()), [1, 1, block_n, block_d])
                     for x in (k, v))
        if key is not None:
            while len(_TMA_CACHE) >= TMA_DESC_CACHE:  # first in, first out
                _TMA_CACHE.pop(next(iter(_TMA_CACHE)), None)
            _TMA_CACHE[key] = pair
    return pair[0], pair[1], True


def train_forward_chunk(l_q: int, rows_per_query: int) -> int:
    """Queries per chunk of the training forward over l_q queries of rows_per_query = B·H_Q rows each (see
    TRAIN_FWD_PARTS)."""
    return min(TRAIN_CHUNK, max(-(-TRAIN_FWD_MIN_ROWS // rows_per_query), -(-l_q // TRAIN_FWD_PARTS)))


def train_forward_heads(l_q: int, rows_per_query: int, group: int) -> int:
    """Query heads per chunk of the training forward by heads (TRAIN_FWD_BY_HEADS): the largest divisor of the KV
    group size `group` whose rows (heads × l_q) do not exceed a chunk of `train_forward_chunk`; 0 when one head
    already does (the forward then chunks queries)."""
    heads = min(group, train_forward_chunk(l_q, rows_per_query) * rows_per_query // l_q)
    while heads and group % heads:
        heads -= 1
    return heads


try:  # grid dependency control (programmatic dependent launch), Triton >= 3.4 on Hopper+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_PDL = True
except ImportError:  # an older Triton: kernels never take the PDL branch (pdl_launch refuses it)
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


def pdl_launch(pdl: bool) -> dict:
    """Launch options of a kernel that takes part in programmatic dependent launch (Hopper+: the kernel's programs
    may start before the previous kernel ends; each calls gdc_wait before touching memory). Empty when off."""
    if pdl and (INTERPRET or not HAS_PDL):
        raise ValueError("pdl: programmatic dependent launch needs a CUDA device and Triton >= 3.4")
    return {"launch_pdl": True} if pdl else {}


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def block_d(d: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot needs inner dims >= 16)."""
    return max(16, next_pow2(d))


def head_rows(group: int, l_q: int, target: int = TARGET_ROWS) -> tuple[int, int, int]:
    """(GH, BQ, n_head_chunks) for the row layout: GH heads x BQ queries per program (about `target` rows),
    GH*BQ >= 16."""
    gh = min(next_pow2(group), MAX_HEAD_CHUNK)
    n_chunks = -(-group // gh)
    bq = max(1, target // gh)
    bq = min(bq, next_pow2(l_q))
    bq = max(bq, -(-16 // gh))  # tl.dot needs >= 16 rows
    return gh, bq, n_chunks


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not be rounded to TF32 (docs/algorithm.md §3.8: nothing cast silently)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def geometry_tables(cfg: SpanConfig, l_kv: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets F(0..M(L_KV)+1), B[t], Fw[t] for t <= L_KV): int64 device tensors, cached per cache size.

    Sized by L_KV (not by the call's largest position), so a decode loop reuses the same tensors
    every step and nothing is rebuilt or synchronised (CUDA-graph friendly).
    """
    offsets = stripe_table(cfg, l_kv, device=device)
    backward, forward = span_lengths(cfg, l_kv, device=device)
    return offsets, backward, forward


def max_stripes(offsets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 [L_Q]: M(q + 1) per query position, by binary search in the exact table (docs/algorithm.md §1.6)."""
    return torch.searchsorted(offsets, positions + 1, right=True) - 1
