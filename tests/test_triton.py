"""Triton backend against the dense oracle: routing, outputs and gradients.

Without CUDA the kernels run in Triton's CPU interpreter, which must be switched on before the
kernels are defined: TRITON_INTERPRET=1 is set here, before `superlinear_kernels.triton` is first
imported (nothing else in the CPU test suite imports it). The interpreter gets bf16 `tl.dot` wrong,
so CPU runs use fp32 and fp16 only; the `gpu`-marked tests repeat the comparison on CUDA with bf16.
Shapes are tiny because the interpreter executes every block operation in numpy.
"""
from __future__ import annotations

import pytest
import torch

from helpers import triton_backend_or_skip  # noqa: E402

triton_backend = triton_backend_or_skip()  # before anything imports the kernels

from helpers import assert_close, left_padded_mask, random_inputs  # noqa: E402
from superlinear_kernels import SpanConfig, span_search, superlinear_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

DEFAULT = SpanConfig.default()  # N = 2, σ = 3 (W = 15), K = 2, b_f = 2
# The release preset's fractional powers (p = ρ = 0.55, b_f = 3, f_f = 1) with a window small enough
# for routing to be active at interpreter-sized lengths.
RELEASE_SMALL = SpanConfig.release().replace(sw_index=5)
NO_WINDOW = SpanConfig(sw_index=0, num_spans=1, backward_factor=2.0, forward_factor=0.0,
                       span_power=0.5, search_power=0.5)
K3_FORWARD = SpanConfig(sw_index=2, num_spans=3, backward_factor=2.0, forward_factor=1.0,
                        span_power=0.5, search_power=1 / 3)


def _routing_equal(ref, got):
    for field in ("qstart", "qanchor", "qend"):
        r, g = getattr(ref, field), getattr(got, field)
        assert r.dtype == g.dtype == torch.int32, f"{field}: dtype {g.dtype}"
        mismatch = (r != g).nonzero()
        assert mismatch.numel() == 0, f"{field}: {mismatch.shape[0]} slots differ, first at {mismatch[0].tolist()}"
    finite = torch.isfinite(ref.values)
    assert torch.equal(finite, torch.isfinite(got.values)), "values: -inf slots differ"
    assert_close("values", ref.values[finite], got.values[finite], 1e-5)


def _compare(cfg, b, h_q, h_kv, l_q, l_kv, d, dtype, starts=None, positions=None, grads=True, seed=0):
    """Run oracle and triton on the same inputs; compare routing, gate, output and (optionally) gradients."""
    q1, q2, k, v = random_inputs(b, h_q, h_kv, l_q, l_kv, d, dtype=dtype, seed=seed, device=DEVICE)
    positions = torch.arange(l_kv - l_q, l_kv) if positions is None else torch.as_tensor(positions)
    mask = None if starts is None else left_padded_mask(b, l_kv, starts, device=DEVICE)
    weight = torch.randn(b, h_q, l_q, d, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    results = {}
    for backend in ("oracle", "triton"):
        inputs = [x.clone().requires_grad_(grads) for x in (q1, q2, k, v)]
        out, routing = superlinear_attention(*inputs, positions, cfg, attention_mask=mask, backend=backend,
                                             return_routing=True)
        if grads:
            (out.float() * weight).sum().backward()
        results[backend] = (out, routing, [x.grad for x in inputs])
    (ref_out, ref_r, ref_g), (out, r, g) = results["oracle"], results["triton"]
    assert out.dtype == dtype, f"out: dtype {out.dtype}, expected {dtype}"
    _routing_equal(ref_r, r)
    assert_close("gate", ref_r.gate, r.gate, 1e-5)
    assert_close("out", ref_out.float(), out.float(), OUT_TOL[dtype])
    if grads:
        for name, ref_grad, grad in zip(("dq1", "dq2", "dk", "dv"), ref_g, g):
            assert grad.dtype == dtype, f"{name}: dtype {grad.dtype}"
            assert_close(name, ref_grad.float(), grad.float(), GRAD_TOL[dtype])


# (id, cfg, B, H_Q, H_KV, L_Q, L_KV, D, row starts or None)
PREFILL = [
    ("default-mha-odd", DEFAULT, 1, 2, 2, 37, 37, 16, None),
    ("default-gqa2-mask", DEFAULT, 2, 4, 2, 45, 45, 24, [0, 11]),
    ("default-gqa4", DEFAULT, 1, 4, 1, 53, 53, 32, None),
    ("default-gqa16-mask", DEFAULT, 2, 16, 1, 29, 29, 16, [4, 0]),
    ("release-small-gqa2", RELEASE_SMALL, 1, 4, 2, 61, 61, 16, None),
    ("release-small-mask", RELEASE_SMALL, 2, 2, 1, 47, 47, 16, [0, 13]),
    ("k1-no-window", NO_WINDOW, 1, 2, 1, 33, 33, 16, None),
    ("k3-forward-n3", K3_FORWARD, 2, 4, 2, 41, 41, 16, [5, 0]),
    ("chunk-tail", DEFAULT, 1, 4, 2, 19, 50, 16, None),  # the last 19 queries of a 50-key cache
    ("d-not-pow2", DEFAULT, 1, 3, 1, 27, 27, 40, None),  # G = 3, D = 40
    ("long-multiblock", DEFAULT, 1, 4, 2, 230, 230, 16, [17]),  # several key blocks per span and window
    ("release-small-long", RELEASE_SMALL, 1, 2, 1, 300, 300, 16, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", PREFILL, ids=[c[0] for c in PREFILL])
def test_prefill_matches_oracle(case, dtype):
    _, cfg, b, h_q, h_kv, l_q, l_kv, d, starts = case
    _compare(cfg, b, h_q, h_kv, l_q, l_kv, d, dtype, starts=starts)


@pytest.mark.parametrize("cfg", [DEFAULT, RELEASE_SMALL], ids=["default", "release-small"])
def test_chunked_prefill_equals_one_shot(cfg):
    """Prefill in chunks of cache positions gives the one-shot rows (and each chunk matches the oracle)."""
    b, h_q, h_kv, l, d = 2, 4, 2, 44, 16
    q1, q2, k, v = random_inputs(b, h_q, h_kv, l, l, d, device=DEVICE)
    mask = left_padded_mask(b, l, [0, 7], device=DEVICE)
    full = superlinear_attention(q1, q2, k, v, torch.arange(l), cfg, attention_mask=mask, backend="triton")
    for c0, c1 in ((0, 13), (13, 30), (30, 44)):
        pos = torch.arange(c0, c1)
        part = superlinear_attention(q1[:, :, c0:c1], q2[:, :, c0:c1], k, v, pos, cfg, attention_mask=mask,
                                     backend="triton")
        ref = superlinear_attention(q1[:, :, c0:c1], q2[:, :, c0:c1], k, v, pos, cfg, attention_mask=mask,
                                    backend="oracle")
        assert_close(f"chunk {c0}:{c1} vs one-shot", full[:, :, c0:c1], part, 1e-5)
        assert_close(f"chunk {c0}:{c1} vs oracle", ref, part, 1e-4)


def test_non_contiguous_cache_positions():
    _compare(DEFAULT, 1, 4, 2, 5, 60, 16, torch.float32, positions=[3, 40, 41, 17, 59])


@pytest.mark.parametrize("skip, sort, split, lean, span_block, nxt, rotate", [
    (True, False, False, False, None, False, 0), (False, False, False, False, None, False, 0),
    (True, True, False, False, None, False, 0), (True, True, False, False, None, True, 0),
    (True, True, False, True, None, True, 0), (True, True, False, False, 32, False, 0),
    (True, True, False, True, 32, True, 0), (True, True, False, "masked", 32, True, 0),
    (True, False, True, False, None, False, 0), (True, False, True, False, None, False, 3),
    (True, False, False, False, None, False, 2)],
    ids=["skip", "masked", "sorted", "sorted-next", "sorted-lean-next", "sorted-span-block-32",
         "sorted-lean-next-span-block-32", "sorted-lean-masked-next-span-block-32", "window-split",
         "window-split-rotate", "skip-rotate"])
def test_backward_small_tiles(monkeypatch, skip, sort, split, lean, span_block, nxt, rotate):
    """The key-major dK/dV kernels with many small key blocks and pair tiles: a block meets many tiles, tiles end
    and start inside blocks, and queries come in no particular order (the window's position sort). `masked`:
    tiles that miss the block are computed under the masks instead of skipped; `sorted`: the span kernel reads
    the pair arrays gathered into sorted order; `sorted-next`: and each loop trip reads the next tile's key range
    ahead (`span.KV_NEXT`); `sorted-lean-next`: both, with the lean visits (`span.KV_LEAN`: the gate folded
    into lse and Δ, dead pairs through their lse, tiles whose live spans all hold the block without the per-key mask;
    here both kinds of visit occur, and dead pairs sort into the last tiles); `sorted-span-block-32`: the span
    kernel's key blocks (`span.KV_BLOCK_N`) twice the window kernel's; `sorted-lean-next-span-block-32`: the lean
    visits with the next tile's range read ahead in key blocks of their own (as `span.KV_BLOCK_N = 64` with
    128-key window blocks); `sorted-lean-masked-...`: the same with every lean visit under the per-key mask
    (`span.KV_INTERIOR = False`); `...-rotate`: the window kernel visits its runs of query trips from a rotated start
    (`window.KV_ROTATE`; 3 or 2 programs assumed resident, so the runs start at many phases; masked only in
    `skip-rotate`, split in `window-split-rotate`; every other case sets 0, in order); `window-split`: the window
    kernel's loop trips whose queries' windows all hold the key block run without the per-key mask (W = 24 or 26 over
    16-key blocks and 8-query trips: such trips exist, between masked ones, and rows starting inside or after a
    block must not use them; then 16 heads of one KV group, so a trip is one query and the run's ends are checked
    to the query)."""
    from superlinear_kernels.triton import span, window

    monkeypatch.setattr(span, "KV_SKIP", skip)
    monkeypatch.setattr(span, "KV_SORTED", sort)
    monkeypatch.setattr(span, "KV_LEAN", bool(lean))
    monkeypatch.setattr(span, "KV_INTERIOR", lean != "masked")
    monkeypatch.setattr(span, "KV_BLOCK_N", span_block)
    monkeypatch.setattr(span, "KV_NEXT", nxt)
    monkeypatch.setattr(window, "KV_ROTATE", rotate)
    monkeypatch.setattr(window, "KV_SPLIT", split)
    monkeypatch.setattr(window, "KV_ROWS", 16)
    monkeypatch.setattr(window, "KV_BLOCK", 16)
    monkeypatch.setattr(span, "_blocks", lambda d: (max(16, d), 16, 16))
    monkeypatch.setattr(span, "KV_TILE", 16)
    _compare(RELEASE_SMALL, 1, 4, 2, 120, 120, 16, torch.float32, starts=[9])
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)) + 60
    _compare(K3_FORWARD, 2, 4, 2, 40, 100, 16, torch.float32, starts=[0, 21], positions=order.tolist())
    if split:
        _compare(RELEASE_SMALL, 1, 16, 1, 64, 64, 16, torch.float32, starts=[5])


def test_window_kv_rotate_follows_the_device(monkeypatch):
    """`window.KV_ROTATE`'s default (None): the window dK/dV kernel's runs rotated for the SM count of the tensors'
    CUDA device (`window.kv_rotate`, asked of the driver once per device: mocked here, no GPU), in order (0) in the
    interpreter and off CUDA; a value set (0 included, as bench's --set window.KV_ROTATE=132) wins on any device.
    And the launcher passes kv_rotate's value for its tensors' device to the kernel (a spy in the kernel's place)."""
    from types import SimpleNamespace

    from superlinear_kernels.triton import common, window

    asked = []

    def properties(index):
        asked.append(index)
        return SimpleNamespace(multi_processor_count={0: 132, 1: 78}[index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(common, "_SM_COUNT", {})
    monkeypatch.setattr(common, "INTERPRET", False)
    assert window.KV_ROTATE is None
    cuda0, cuda1, cpu = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
    assert [window.kv_rotate(x) for x in (cuda0, cuda1, cuda0, cuda1)] == [132, 78, 132, 78]
    assert asked == [0, 1]  # once per device
    assert window.kv_rotate(cpu) == 0
    monkeypatch.setattr(common, "INTERPRET", True)
    assert window.kv_rotate(cuda0) == 0
    for n in (0, 132, 7):
        monkeypatch.setattr(window, "KV_ROTATE", n)
        assert window.kv_rotate(cuda0) == window.kv_rotate(cpu) == n

    launches = []

    class Spy:  # `_window_bwd_kv_kernel[grid](...)`: records the launch instead of running it
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((args[5].numel(), kwargs["ROTATE"]))

    monkeypatch.setattr(window, "_window_bwd_kv_kernel", Spy())
    monkeypatch.setattr(window, "kv_rotate", lambda device: 5 if device == k.device else -1)
    b, h_q, h_kv, l, d = 1, 4, 2, 300, 16
    q2, do = torch.zeros(b, h_q, l, d), torch.zeros(b, h_q, l, d)
    k, v = torch.zeros(b, h_kv, l, d), torch.zeros(b, h_kv, l, d)
    lse, delta = torch.zeros(b, h_q, l), torch.zeros(b, h_q, l)
    dk, dv = torch.zeros(b, h_kv, l, d), torch.zeros(b, h_kv, l, d)
    window.window_backward_kv(q2, k, v, torch.arange(l), torch.zeros(b, dtype=torch.long), 15, do, lse, delta, dk, dv)
    n_blocks = -(-l // window.KV_BLOCK)
    assert launches == [(4 * n_blocks + 1, 5)]  # the runs [n_blocks, 4] and the period after them


@pytest.mark.parametrize("split, fold", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["interior", "masked", "interior-fold", "masked-fold"])
def test_forward_small_tiles(monkeypatch, split, fold):
    """The window and span forwards with small key blocks, pair tiles and row blocks: tiles then have interior key
    blocks (inside the keys of every row, computed without masks) between masked edge blocks, and tiles end and
    start inside blocks. `masked`: every block under the masks. `fold`: the scale folded into exp2's argument
    (`window.FWD_FOLD`). Outputs and gradients match the oracle."""
    from superlinear_kernels.triton import span, window

    monkeypatch.setattr(span, "_blocks", lambda d: (max(16, d), 16, 16))  # the pair sort by 16-key blocks
    monkeypatch.setattr(window, "FWD_FOLD", fold)
    for mod, rows in ((span, "FWD_BLOCK_P"), (window, "FWD_ROWS")):
        monkeypatch.setattr(mod, rows, 16)
        monkeypatch.setattr(mod, "FWD_BLOCK_N", 16)
        monkeypatch.setattr(mod, "FWD_SPLIT", split)
    _compare(RELEASE_SMALL, 1, 4, 2, 120, 120, 16, torch.float32, starts=[9])
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)) + 60
    _compare(K3_FORWARD, 2, 4, 2, 40, 100, 16, torch.float16, starts=[0, 21], positions=order.tolist())


@pytest.mark.parametrize("l_kv, block_n", [(3000, 64), (1 << 21, 16)], ids=["int32-keys", "int64-keys"])
def test_pair_sort_order(l_kv, block_n):
    """`span.sort_pairs` orders the pairs by (KV group, first key block, last key block), empty spans last in their
    group, as a naive stable sort of that key does (equal keys in any order); 2M keys in 16-key blocks need int64 keys
    (`_pair_key_kernel`'s WIDE)."""
    from superlinear_kernels.triton import span

    gen = torch.Generator().manual_seed(0)
    b, h_q, h_kv, l_q, k = 2, 8, 2, 40, 3
    qs = torch.randint(-1, l_kv, (b, h_q, l_q, k), generator=gen, dtype=torch.int32)
    qe = (qs + torch.randint(-50, 2000, qs.shape, generator=gen, dtype=torch.int32)).clamp(max=l_kv - 1)
    qs.view(-1)[::7] = -1  # invalid slots; the -50 above also gives spans that end before they start
    qe = torch.where(qs < 0, -1, qe).to(torch.int32)
    order = span.sort_pairs(qs.to(DEVICE), qe.to(DEVICE), h_kv, block_n, l_kv).cpu()
    n_groups, n_blocks = b * h_kv, -(-l_kv // block_n)
    key = []
    for pair, (s0, e0) in enumerate(zip(qs.reshape(-1).tolist(), qe.reshape(-1).tolist())):
        group = pair // (h_q // h_kv * l_q * k)
        key.append((group, s0 // block_n, e0 // block_n) if 0 <= s0 <= e0 else (group, n_blocks, 0))
    assert sorted(order.tolist()) == list(range(len(key)))
    assert [key[i] for i in order.tolist()] == sorted(key)


@pytest.mark.parametrize("split", [True, False], ids=["interior", "masked"])
def test_dq_small_blocks(monkeypatch, split):
    """The query-major dQ kernels (window and span) with 16-key blocks and 16-row tiles: windows and spans then
    cover interior key blocks (computed without masks with `window.DQ_SPLIT`) between masked edge blocks, and tiles
    hold pairs whose spans start and end inside blocks. `masked`: every block under the masks. Gradients match the
    oracle, also with left padding (rows without keys) and queries in no particular order."""
    from superlinear_kernels.triton import span, window

    monkeypatch.setattr(span, "_blocks", lambda d: (max(16, d), 16, 16))
    monkeypatch.setattr(window, "DQ_BLOCK_N", 16)
    monkeypatch.setattr(window, "DQ_ROWS", 16)
    monkeypatch.setattr(window, "DQ_SPLIT", split)
    _compare(RELEASE_SMALL, 1, 4, 2, 120, 120, 16, torch.float32, starts=[9])
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)) + 60
    _compare(K3_FORWARD, 2, 4, 2, 40, 100, 16, torch.float16, starts=[0, 21], positions=order.tolist())


@pytest.mark.parametrize("chunk", [1 << 20, 16], ids=["one-shot", "chunks"])
def test_backward_without_residuals(monkeypatch, chunk):
    """`common.KEEP_RESIDUALS = False`: the forward keeps only the window's lse, and the backward recomputes
    dO·O_k (a window pass per row and a pass over the pair tiles) for the gate and Δ gradients. Gradients match the
    oracle: windowed and window-free presets, left padding (rows without keys), K = 1 and 3, in one shot and in
    query chunks; small pair tiles and key blocks (16), so a pass meets many blocks and tiles."""
    from superlinear_kernels.triton import common, span, window

    monkeypatch.setattr(common, "KEEP_RESIDUALS", False)
    monkeypatch.setattr(span, "_blocks", lambda d: (max(16, d), 16, 16))
    monkeypatch.setattr(window, "FWD_ROWS", 16)
    monkeypatch.setattr(window, "FWD_BLOCK_N", 16)
    monkeypatch.setattr(window, "DQ_BLOCK_N", 16)
    monkeypatch.setattr(common, "TRAIN_CHUNK", chunk)
    _compare(RELEASE_SMALL, 2, 4, 2, 61, 61, 16, torch.float32, starts=[0, 13])
    _compare(NO_WINDOW, 1, 2, 1, 33, 33, 16, torch.float16)
    _compare(K3_FORWARD, 2, 4, 2, 41, 41, 16, torch.float32, starts=[5, 0])


@pytest.mark.parametrize("mode", ["forward-and-dq", "forward-queries", "forward-by-heads"])
def test_training_in_chunks(monkeypatch, mode):
    """Training over more than a chunk: the forward runs window, spans and gate in chunks and the backward its dQ2 in
    chunks of TRAIN_CHUNK queries (the last partial); outputs and gradients still match the oracle.
    `forward-and-dq`: TRAIN_CHUNK = 16 (the forward's chunks by heads, the default); `forward-queries`: only the forward
    in chunks, of queries (`common.train_forward_chunk`, TRAIN_FWD_BY_HEADS off), the backward in one piece over the
    whole call's pair sort; `forward-by-heads`: the forward's chunks are query heads (`common.train_forward_heads`):
    a whole KV group of both batch rows, one head of a group, and a call where one head holds more rows than a chunk
    (query chunks then)."""
    from superlinear_kernels.triton import common

    if mode == "forward-and-dq":
        monkeypatch.setattr(common, "TRAIN_CHUNK", 16)
    else:
        monkeypatch.setattr(common, "TRAIN_FWD_MIN_ROWS", 64)
        monkeypatch.setattr(common, "TRAIN_FWD_PARTS", 4)
        assert common.train_forward_chunk(61, 2 * 4) == 16 and common.train_forward_chunk(37, 4) == 16
        monkeypatch.setattr(common, "TRAIN_FWD_BY_HEADS", mode == "forward-by-heads")
        assert common.train_forward_heads(61, 2 * 4, 2) == 2 and common.train_forward_heads(37, 4, 2) == 1
        assert common.train_forward_heads(100, 20, 12) == 4 and common.train_forward_heads(100, 32, 16) == 8
    _compare(RELEASE_SMALL, 2, 4, 2, 61, 61, 16, torch.float32, starts=[0, 13])
    _compare(DEFAULT, 1, 4, 2, 37, 70, 16, torch.float16, positions=list(range(69, 32, -1)))
    if mode == "forward-by-heads":
        monkeypatch.setattr(common, "TRAIN_FWD_MIN_ROWS", 8)
        assert common.train_forward_heads(61, 2, 2) == 0
        _compare(RELEASE_SMALL, 1, 2, 1, 61, 61, 16, torch.float32, starts=[5])


def _attention_node(out):
    """The Triton op's autograd node (its ctx) behind `out`."""
    todo, seen = [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "_AttentionFunction" in type(node).__name__:
            return node
        todo.extend(n for n, _ in node.next_functions)
    raise AssertionError("no _AttentionFunction node behind the output")


@pytest.mark.parametrize("chunk", [1 << 20, 16], ids=["one-shot", "chunks"])
def test_residuals_freed_by_first_backward(monkeypatch, chunk):
    """The residuals R_k live until the gate backward has read them: the first backward drops them, and a second
    backward through the same graph (retain_graph=True) recomputes dO·O_k from the window's lse — both give the
    oracle's gradients."""
    from superlinear_kernels.triton import common

    monkeypatch.setattr(common, "TRAIN_CHUNK", chunk)
    q1, q2, k, v = random_inputs(2, 4, 2, 61, 61, 16, dtype=torch.float32, seed=4, device=DEVICE)
    mask = left_padded_mask(2, 61, [0, 13], device=DEVICE)
    weight = torch.randn(2, 4, 61, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = {}
    for backend in ("oracle", "triton"):
        xs = [x.clone().requires_grad_() for x in (q1, q2, k, v)]
        out = superlinear_attention(*xs, torch.arange(61), RELEASE_SMALL, attention_mask=mask, backend=backend)
        loss = (out.float() * weight).sum()
        if backend == "triton":
            node = _attention_node(out)
            assert node.residuals is not None
        loss.backward(retain_graph=True)
        first = [x.grad.clone() for x in xs]
        if backend == "triton":
            assert node.residuals is None, "the first backward kept the residuals"
        for x in xs:
            x.grad = None
        loss.backward()
        grads[backend] = (first, [x.grad for x in xs])
    for name, ref, got_first, got_second in zip(("dq1", "dq2", "dk", "dv"), grads["oracle"][0], *grads["triton"]):
        assert_close(f"{name} first backward", ref, got_first, GRAD_TOL[torch.float32])
        assert_close(f"{name} second backward", ref, got_second, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", [DEFAULT, RELEASE_SMALL, K3_FORWARD, NO_WINDOW],
                         ids=["default", "release-small", "k3", "no-window"])
def test_decode_batch_left_padding(cfg, dtype):
    """L_Q = 1 at one position, batch 3 with different row starts (Decision D4 in docs/design.md), vs the oracle."""
    _compare(cfg, 3, 8, 2, 1, 90, 16, dtype, starts=[0, 23, 70], positions=[85])


@pytest.mark.parametrize("split", [2, 5])
def test_decode_search_split_runs(monkeypatch, split):
    """Decode splits the stripe list into runs and merges partial top-K lists: same routing as the oracle."""
    from superlinear_kernels.triton import search

    monkeypatch.setattr(search, "DECODE_SPLIT", split)
    _compare(RELEASE_SMALL.replace(num_spans=3), 2, 4, 2, 1, 300, 16, torch.float32, starts=[0, 40],
             positions=[297], grads=False)
    _compare(DEFAULT.replace(num_spans=4), 1, 2, 1, 1, 200, 16, torch.float32, positions=[150], grads=False)


def test_decode_key_chunks(monkeypatch):
    """Tiny key chunks and blocks: spans and the window cross several chunks, a chunk holds the end of
    one span and the start of the window, untouched chunks are skipped; same as the oracle."""
    from superlinear_kernels.triton import decode

    monkeypatch.setattr(decode, "DECODE_BLOCK_N", 16)
    monkeypatch.setattr(decode, "decode_chunk", lambda l_kv: 32)
    _compare(RELEASE_SMALL.replace(sw_index=6), 2, 4, 1, 1, 300, 16, torch.float32, starts=[0, 31],
             positions=[290], grads=False)
    _compare(DEFAULT.replace(num_spans=3), 1, 4, 2, 1, 200, 16, torch.float32, positions=[170], grads=False)
    # Row 1 starts after the query: no keys at all, output 0 and never NaN (docs/algorithm.md §3.3).
    _compare(RELEASE_SMALL, 2, 4, 2, 1, 120, 16, torch.float32, starts=[0, 119], positions=[100], grads=False)


def test_decode_head_dim_not_pow2():
    """D = 40 pads the tiles to 64 (masked loads along D) and G = 3 heads per KV group."""
    _compare(RELEASE_SMALL, 2, 6, 2, 1, 150, 40, torch.float32, starts=[0, 17], positions=[149])


def test_decode_row_blocks(monkeypatch):
    """A group's (head, slot) rows split over several programs (G x K > DECODE_MAX_ROWS)."""
    from superlinear_kernels.triton import decode

    monkeypatch.setattr(decode, "DECODE_MAX_ROWS", 16)
    monkeypatch.setattr(decode, "decode_chunk", lambda l_kv: 64)
    _compare(RELEASE_SMALL, 1, 8, 1, 1, 200, 16, torch.float32, positions=[199], grads=False)  # 24 rows


def test_decode_equals_prefill_row():
    cfg = RELEASE_SMALL
    b, h_q, h_kv, l, d = 2, 4, 1, 57, 16
    q1, q2, k, v = random_inputs(b, h_q, h_kv, l, l, d, device=DEVICE)
    mask = left_padded_mask(b, l, [0, 9], device=DEVICE)
    full = superlinear_attention(q1, q2, k, v, torch.arange(l), cfg, attention_mask=mask, backend="triton")
    for q in (8, 30, 56):
        step = superlinear_attention(q1[:, :, q:q + 1], q2[:, :, q:q + 1], k, v, torch.tensor([q]), cfg,
                                     attention_mask=mask, backend="triton")
        assert_close(f"decode at {q}", full[:, :, q:q + 1], step, 1e-5)


def test_padding_queries_are_zero_not_nan():
    """Queries before the row start have no keys at all: output 0, gradients finite (docs/algorithm.md §3.1, §3.3)."""
    _compare(DEFAULT, 1, 2, 1, 20, 20, 16, torch.float32, starts=[12])


@pytest.mark.parametrize("ordered", [False, True], ids=["merge", "ordered"])
@pytest.mark.parametrize("num_spans", [1, 2, 3, 4])
def test_search_routing_and_values(monkeypatch, num_spans, ordered):
    """Routing and values equal the oracle's, with the top-K kept as (score, anchor) pairs (K = 1, 2) or as one
    int64 key per slot (K = 3, 4; `search.SEARCH_KEYED`), or as named slots filled in anchor order
    (`search.SEARCH_ORDERED`); negative and positive scores, left padding."""
    from superlinear_kernels.triton import search

    monkeypatch.setattr(search, "SEARCH_KEYED", num_spans > 2)
    monkeypatch.setattr(search, "SEARCH_ORDERED", ordered)
    cfg = RELEASE_SMALL.replace(num_spans=num_spans)
    b, h_q, h_kv, l, d = 2, 8, 2, 70, 16
    q1, _, k, _ = random_inputs(b, h_q, h_kv, l, l, d, device=DEVICE)
    mask = left_padded_mask(b, l, [0, 21], device=DEVICE)
    ref = span_search(q1, k, torch.arange(l), cfg, attention_mask=mask, backend="oracle")
    got = span_search(q1, k, torch.arange(l), cfg, attention_mask=mask, backend="triton")
    _routing_equal(ref, got)


@pytest.mark.parametrize("num_spans", [5, 7])
def test_search_has_no_built_in_k(monkeypatch, num_spans):
    """The search kernels take any K (the top-K is a register tile, not four named slots): with the backend's
    K limit raised, prefill search and the split decode search (partial top-K lists, then the merge kernel)
    still route like the oracle, ties included."""
    from superlinear_kernels.triton import ops, search

    monkeypatch.setattr(ops, "MAX_SPANS", 8)
    monkeypatch.setattr(search, "DECODE_SPLIT", 3)
    cfg = DEFAULT.replace(num_spans=num_spans, sw_index=1)
    b, h_q, h_kv, l, d = 1, 4, 2, 90, 16
    q1, _, k, _ = random_inputs(b, h_q, h_kv, l, l, d, device=DEVICE)
    k[:, :, ::7] = k[:, :, :1]  # repeated keys: equal scores, so the tie rule decides between slots
    mask = left_padded_mask(b, l, [5], device=DEVICE)
    for positions in (torch.arange(l), torch.tensor([l - 1])):
        ref = span_search(q1[:, :, positions], k, positions, cfg, attention_mask=mask, backend="oracle")
        got = span_search(q1[:, :, positions], k, positions, cfg, attention_mask=mask, backend="triton")
        _routing_equal(ref, got)
        assert int(got.valid.sum(-1).max()) == num_spans


def test_non_finite_values_are_nan_never_inf():
    """Inf in V: queries whose key set holds the bad key are NaN (as on the oracle), no output is ±Inf, and
    the other KV head's queries stay finite and equal to the oracle (within one head, tile mates of a
    poisoned query may be NaN too: the documented Triton caveat)."""
    q1, q2, k, v = random_inputs(1, 4, 2, 60, 60, 16, seed=4, device=DEVICE)
    v[0, 0, 40, 2] = float("inf")
    ref = superlinear_attention(q1, q2, k, v, torch.arange(60), DEFAULT, backend="oracle")
    out = superlinear_attention(q1, q2, k, v, torch.arange(60), DEFAULT, backend="triton")
    assert not torch.isinf(out).any()
    assert torch.isnan(out)[torch.isnan(ref)].all(), "a query that reads the bad key must be NaN"
    safe = torch.zeros_like(ref, dtype=torch.bool)
    safe[:, 2:] = True  # query heads 2, 3 read KV head 1, never KV head 0's values
    assert torch.isfinite(out[safe]).all()
    assert_close("finite queries", ref[safe], out[safe], 1e-4)


@pytest.mark.parametrize("mode", ["pairs", "keyed", "ordered"])
def test_search_tie_rule_earlier_position_wins(monkeypatch, mode):
    """Identical keys give identical scores: the earliest anchors must win (docs/algorithm.md §2.3). "keyed": the
    prefill search keeps its top-K as one int64 key per slot (score bits, then the anchor reversed); "ordered": as
    named slots filled in anchor order, a later anchor entering only with a strictly higher score."""
    from superlinear_kernels.triton import search

    monkeypatch.setattr(search, "SEARCH_KEYED", mode == "keyed")
    monkeypatch.setattr(search, "SEARCH_ORDERED", mode == "ordered")
    cfg = DEFAULT.replace(num_spans=3)
    b, h_q, h_kv, l, d = 1, 4, 2, 64, 16
    q1, _, k, _ = random_inputs(b, h_q, h_kv, l, l, d, device=DEVICE)
    k = k[:, :, :1].expand(b, h_kv, l, d).contiguous()
    ref = span_search(q1, k, torch.arange(l), cfg, backend="oracle")
    got = span_search(q1, k, torch.arange(l), cfg, backend="triton")
    _routing_equal(ref, got)
    anchors = got.qanchor[got.qanchor >= 0].view(-1)
    assert anchors.numel() > 0


@pytest.mark.parametrize("num_spans", [1, 2, 3, 4])
def test_search_ordered_over_many_trips(monkeypatch, num_spans):
    """`search.SEARCH_ORDERED` over many 16-stripe trips (sw_index 1, 600 keys: up to ~40 trips per query), so the
    slots fill up early and later trips insert one, several or no candidates. Every 5th key repeats key 0 (equal
    scores across trips and inside one trip: the earliest anchor must win); the other rows are random. Routing and
    values == the oracle."""
    from superlinear_kernels.triton import search

    monkeypatch.setattr(search, "SEARCH_ORDERED", True)
    cfg = DEFAULT.replace(num_spans=num_spans, sw_index=1)
    b, h_q, h_kv, l, d = 1, 4, 2, 600, 16
    q1, _, k, _ = random_inputs(b, h_q, h_kv, l, l, d, seed=7, device=DEVICE)
    k[:, :, ::5] = k[:, :, :1]
    positions = torch.arange(l - 40, l)
    ref = span_search(q1[:, :, positions], k, positions, cfg, backend="oracle")
    got = span_search(q1[:, :, positions], k, positions, cfg, backend="triton")
    _routing_equal(ref, got)
    assert int(got.valid.sum(-1).min()) == num_spans


def test_search_gradient_through_values():
    cfg = DEFAULT
    b, h_q, h_kv, l, d = 1, 4, 2, 40, 16
    q1, _, k, _ = random_inputs(b, h_q, h_kv, l, l, d, device=DEVICE)
    grads = {}
    for backend in ("oracle", "triton"):
        a, bk = q1.clone().requires_grad_(), k.clone().requires_grad_()
        r = span_search(a, bk, torch.arange(l), cfg, backend=backend)
        finite = torch.isfinite(r.values)
        weight = torch.linspace(-1, 1, r.values.numel()).view(r.values.shape).to(DEVICE)
        (torch.where(finite, r.values, torch.zeros_like(r.values)) * weight).sum().backward()
        grads[backend] = (a.grad, bk.grad)
    assert_close("dq1", grads["oracle"][0], grads["triton"][0], 1e-5)
    assert_close("dk", grads["oracle"][1], grads["triton"][1], 1e-5)


def test_values_and_gate_are_differentiable_like_the_oracle():
    # A loss on the returned routing (search values, gate) reaches q1 and k on every backend.
    q1, q2, k, v = random_inputs(1, 4, 2, 29, 29, 16, seed=11, device=DEVICE)
    grads = {}
    for backend in ("oracle", "triton"):
        inputs = [x.clone().requires_grad_() for x in (q1, q2, k, v)]
        out, r = superlinear_attention(*inputs, torch.arange(29), DEFAULT, backend=backend, return_routing=True)
        valid = r.qanchor >= 0
        loss = out.sum() + torch.where(valid, r.values, torch.zeros_like(r.values)).sum() + (r.gate ** 2).sum()
        loss.backward()
        grads[backend] = [x.grad for x in inputs]
    for name, ref, got in zip(("dq1", "dq2", "dk", "dv"), grads["oracle"], grads["triton"]):
        assert_close(name, ref, got, 1e-4)


def test_kernel_limits_raise_before_launch():
    q1, q2, k, v = random_inputs(1, 2, 1, 8, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="num_spans"):
        superlinear_attention(q1, q2, k, v, torch.arange(8), DEFAULT.replace(num_spans=5), backend="triton")
    big = [x.new_zeros(*x.shape[:-1], 320) for x in (q1, q2, k, v)]
    with pytest.raises(ValueError, match="q1: head dim"):
        superlinear_attention(*big, torch.arange(8), DEFAULT, backend="triton")
    with pytest.raises(ValueError, match="num_spans"):
        span_search(q1, k, torch.arange(8), DEFAULT.replace(num_spans=7), backend="triton")
    given = span_search(q1, k, torch.arange(8), DEFAULT, backend="oracle")
    with pytest.raises(ValueError, match="routing=.*not 'triton'"):
        superlinear_attention(q1, q2, k, v, torch.arange(8), DEFAULT, backend="triton", routing=given)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("cfg", [DEFAULT, SpanConfig.release()], ids=["default", "release"])
def test_gpu_matches_oracle(cfg, dtype):
    """Moderate sizes on a real GPU (the interpreter can't check bf16 tl.dot)."""
    _compare(cfg, 2, 8, 2, 2500, 2500, 64, dtype, starts=[0, 301], grads=True)
    _compare(cfg, 2, 16, 1, 1, 3000, 128, dtype, starts=[0, 700], positions=[2999], grads=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block", [16, 64])
def test_gpu_forward_tma(monkeypatch, block):
    """The window and span forwards reading their interior key blocks through TMA (`span.FWD_TMA`, `window.FWD_TMA`;
    with the scale folded into exp2, `window.FWD_FOLD`), release preset in bf16 with left padding, 16- and 64-key
    blocks (16: many interior blocks between masked edges, pair tiles of 16): outputs and gradients == the oracle's
    within the bf16 tolerances, and the descriptors are really used."""
    from superlinear_kernels.triton import common, span, window

    for mod in (span, window):
        monkeypatch.setattr(mod, "FWD_TMA", True)
        monkeypatch.setattr(mod, "FWD_BLOCK_N", block)
    monkeypatch.setattr(window, "FWD_FOLD", True)
    if block == 16:
        monkeypatch.setattr(span, "_blocks", lambda d: (max(16, d), 16, 16))
        monkeypatch.setattr(span, "FWD_BLOCK_P", 16)
    k = random_inputs(2, 8, 2, 8, 2500, 64, dtype=torch.bfloat16, device=DEVICE)[2]
    assert common.tma_ok(k, k) and common.tma_descriptors(k, k, block, 64, True)[2]
    _compare(SpanConfig.release(), 2, 8, 2, 2500, 2500, 64, torch.bfloat16, starts=[0, 301], grads=True)
