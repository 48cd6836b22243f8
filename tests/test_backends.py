"""The torch backend against the dense oracle: routing equality, outputs, gradients, tie rule,
chunked prefill and decode, precision, and clear errors for bad input."""
from __future__ import annotations

import random

import pytest
import torch

from helpers import assert_close, left_padded_mask, random_inputs
from superlinear_kernels import SpanConfig, span_search, superlinear_attention


def _cases():
    """≥ 30 deterministic random cases: odd sizes, GQA 1/2/4/8, K = 1..3, both presets, masks,
    chunked and non-contiguous cache positions, decode."""
    rng = random.Random(1234)
    cases = []
    for i in range(36):
        preset = "release" if i % 6 == 5 else "default"
        ratio = [1, 2, 4, 8][i % 4]
        h_kv = 1 if ratio == 8 else rng.choice([1, 2])
        num_spans = 1 + i % 3
        if preset == "release":
            cfg = SpanConfig.release().replace(num_spans=num_spans)
            l_kv = rng.randint(3000, 4200)  # routing is active only past t = W + 1 = 2033
            h_kv, ratio, d = 1, rng.choice([1, 2]), 8
        else:
            cfg = SpanConfig.default().replace(num_spans=num_spans, sw_index=rng.choice([0, 1, 3]),
                                               forward_factor=rng.choice([0.0, 0.0, 1.0]))
            l_kv = rng.randint(40, 260) | 1
            d = rng.choice([8, 16, 24])
        b = rng.choice([1, 2])
        kind = ["full", "chunk", "decode", "scatter"][i % 4]
        if kind == "full":
            positions = list(range(l_kv))
        elif kind == "chunk":
            lo = rng.randint(0, l_kv // 2)
            positions = list(range(lo, rng.randint(lo + 1, l_kv)))
        elif kind == "decode":
            positions = [rng.randint(0, l_kv - 1)]
        else:
            positions = sorted(rng.sample(range(l_kv), min(l_kv, 17)))[::-1]
        if preset == "release":  # queries near the end of the cache, so most rows route
            positions = [p for p in positions if p >= 2100] or list(range(l_kv - 160, l_kv))
            positions = positions[-160:]
        max_start = 50 if preset == "release" else l_kv // 3
        starts = [rng.choice([0, 0, rng.randint(1, max_start)]) for _ in range(b)] if i % 3 else None
        cases.append(pytest.param(
            dict(cfg=cfg, b=b, h_q=h_kv * ratio, h_kv=h_kv, l_kv=l_kv, d=d, positions=positions,
                 starts=starts, seed=i),
            id=f"{i}-{preset}-gqa{ratio}-K{num_spans}-{kind}-L{l_kv}{'-mask' if starts else ''}"))
    return cases


def _run(case, backend, dtype=torch.float32, requires_grad=False):
    q1, q2, k, v = random_inputs(case["b"], case["h_q"], case["h_kv"], len(case["positions"]), case["l_kv"],
                                 case["d"], dtype=dtype, seed=case["seed"])
    tensors = [x.clone().requires_grad_(requires_grad) for x in (q1, q2, k, v)]
    mask = left_padded_mask(case["b"], case["l_kv"], case["starts"]) if case["starts"] else None
    out, routing = superlinear_attention(*tensors, torch.tensor(case["positions"]), case["cfg"], mask,
                                         backend=backend, return_routing=True)
    return out, routing, tensors


CASES = _cases()


@pytest.mark.parametrize("case", CASES)
def test_torch_matches_oracle(case):
    ref, ref_routing, _ = _run(case, "oracle")
    out, routing, _ = _run(case, "torch")
    for field in ("qanchor", "qstart", "qend"):
        assert torch.equal(getattr(ref_routing, field), getattr(routing, field)), f"{field} differs"
        assert getattr(routing, field).dtype == torch.int32
    valid = ref_routing.valid
    assert torch.equal(torch.isinf(routing.values), ~valid)
    assert_close("values", ref_routing.values[valid], routing.values[valid], 1e-5)
    assert_close("gate", ref_routing.gate, routing.gate, 1e-5)
    assert_close("out", ref, out, 1e-5)


@pytest.mark.parametrize("case", CASES[:12:2] + CASES[5:36:12])
def test_torch_gradients_match_oracle(case):
    ref, _, ref_inputs = _run(case, "oracle", requires_grad=True)
    out, _, inputs = _run(case, "torch", requires_grad=True)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    (ref * weight).sum().backward()
    (out * weight).sum().backward()
    for name, a, b in zip(("q1", "q2", "k", "v"), ref_inputs, inputs):
        grad = b.grad if b.grad is not None else torch.zeros_like(b)  # None: not in the graph, i.e. zero
        assert_close(f"d{name}", a.grad, grad, 1e-4)


@pytest.mark.parametrize("backend", ["oracle", "torch"])
def test_tie_rule_earlier_position_wins(backend):
    # All keys equal: every candidate scores the same, so the K earliest candidate anchors win.
    cfg = SpanConfig(sw_index=0, num_spans=3)
    l_kv = 50
    q1 = torch.ones(1, 2, l_kv, 4)
    k = torch.ones(1, 1, l_kv, 4)
    r = span_search(q1, k, torch.arange(l_kv), cfg, backend=backend)
    q = 40  # stripes i = 1..6 give anchors 40, 37, 32, 25, 16, 5
    assert r.qanchor[0, 0, q].tolist() == [5, 16, 25]
    assert r.qanchor[0, 1, q].tolist() == [5, 16, 25]
    assert r.values[0, 0, q].tolist() == [4.0, 4.0, 4.0]


def test_fewer_candidates_than_k_leave_invalid_slots():
    cfg = SpanConfig(sw_index=0, num_spans=4)
    q1, q2, k, v = random_inputs(1, 2, 1, 6, 6, 8)
    for backend in ("oracle", "torch"):
        out, r = superlinear_attention(q1, q2, k, v, torch.arange(6), cfg, backend=backend, return_routing=True)
        assert r.qanchor[0, 0, 0].tolist() == [0, -1, -1, -1]  # q = 0: only stripe 1 (anchor 0)
        assert r.qstart[0, 0, 0, 1:].tolist() == [-1, -1, -1]
        assert torch.isinf(r.values[0, 0, 0, 1:]).all()
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["oracle", "torch"])
def test_padding_queries_give_zero_without_nan(backend):
    cfg = SpanConfig.default()
    q1, q2, k, v = (x.requires_grad_() for x in random_inputs(2, 2, 1, 30, 30, 8))
    mask = left_padded_mask(2, 30, [0, 12])
    out = superlinear_attention(q1, q2, k, v, torch.arange(30), cfg, mask, backend=backend)
    assert torch.equal(out[1, :, :12], torch.zeros_like(out[1, :, :12]))  # q < s: empty key set
    out.sum().backward()
    for x in (q1, q2, k, v):
        assert torch.isfinite(x.grad).all()


def test_short_rows_are_dense_causal_attention():
    # t <= W: no candidates, every branch is the window, i.e. full causal attention over [s, q].
    cfg = SpanConfig.default()  # W = 15
    q1, q2, k, v = random_inputs(1, 4, 2, 15, 15, 16)
    out = superlinear_attention(q1, q2, k, v, torch.arange(15), cfg, backend="torch")
    dense = torch.nn.functional.scaled_dot_product_attention(q2, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True)
    assert_close("out", dense, out, 1e-5)


@pytest.mark.parametrize("cfg", [SpanConfig.default(), SpanConfig(sw_index=0, num_spans=3, forward_factor=1.0)])
def test_chunked_prefill_and_decode_equal_one_shot(cfg):
    l_kv = 181
    q1, q2, k, v = random_inputs(2, 4, 2, l_kv, l_kv, 16, seed=3)
    mask = left_padded_mask(2, l_kv, [0, 9])
    full = superlinear_attention(q1, q2, k, v, torch.arange(l_kv), cfg, mask, backend="torch")
    pieces, start = [], 0
    for size in (50, 1, 64, 33, 1, 32):
        pos = torch.arange(start, start + size)
        pieces.append(superlinear_attention(q1[:, :, pos], q2[:, :, pos], k, v, pos, cfg, mask, backend="torch"))
        start += size
    assert start == l_kv
    assert_close("chunked", full, torch.cat(pieces, dim=2), 1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_keeps_dtype(dtype, tol):
    case = CASES[1].values[0]
    ref, ref_routing, _ = _run(case, "oracle")
    out, routing, _ = _run(case, "torch", dtype=dtype)
    assert out.dtype == dtype
    assert routing.values.dtype == torch.float32
    agree = (ref_routing.qanchor == routing.qanchor).float().mean()
    assert agree > 0.95, f"routing agreement {agree:.3f} under {dtype}"
    assert_close("out", ref, out.float(), tol * 10)


# --------------------------------------------------------------------------- bad input
def _good():
    q1, q2, k, v = random_inputs(1, 4, 2, 8, 8, 16)
    return dict(q1=q1, q2=q2, k=k, v=v, cache_position=torch.arange(8), cfg=SpanConfig.default())


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: a.update(q1=a["q1"].numpy()), TypeError, "q1"),
        (lambda a: a.update(k=a["k"][0]), ValueError, "k"),
        (lambda a: a.update(v=a["v"].double()), TypeError, "v"),
        (lambda a: a.update(q2=a["q2"].half()), TypeError, "q2"),
        (lambda a: a.update(q1=a["q1"].int(), q2=a["q2"].int(), k=a["k"].int(), v=a["v"].int()), TypeError, "q1"),
        (lambda a: a.update(q2=a["q2"][:, :, :5]), ValueError, "q2"),
        (lambda a: a.update(k=a["k"][:, :, :, :8], v=a["v"][:, :, :, :8]), ValueError, "head dim"),
        (lambda a: a.update(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), ValueError, "multiple"),
        (lambda a: a.update(k=torch.randn(2, 2, 8, 16), v=torch.randn(2, 2, 8, 16)), ValueError, "batch"),
        (lambda a: a.update(cache_position=torch.arange(1, 9)), ValueError, "cache_position"),
        (lambda a: a.update(cache_position=torch.arange(7)), ValueError, "cache_position"),
        (lambda a: a.update(cache_position=torch.arange(8.0)), TypeError, "cache_position"),
        (lambda a: a.update(cache_position=torch.arange(-1, 7)), ValueError, "cache_position"),
        (lambda a: a.update(cfg={"sw_index": 3}), TypeError, "cfg"),
        (lambda a: a.update(attention_mask=torch.ones(1, 7, dtype=torch.bool)), ValueError, "attention_mask"),
        (lambda a: a.update(attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]])), ValueError, "left-padded"),
        (lambda a: a.update(attention_mask=torch.tensor([[0, 2, 1, 1, 1, 1, 1, 1]])), ValueError, "0 and 1"),
        (lambda a: a.update(attention_mask=torch.ones(1, 8)), TypeError, "attention_mask"),
        (lambda a: a.update(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    args = _good()
    change(args)
    backend = args.pop("backend", "torch")
    with pytest.raises(error, match=match):
        superlinear_attention(args["q1"], args["q2"], args["k"], args["v"], args["cache_position"], args["cfg"],
                              args.get("attention_mask"), backend=backend)


def test_mask_may_differ_after_the_last_query():
    # Keys after the largest query position are never read, so their mask value does not matter.
    args = _good()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]])
    pos = torch.arange(6)
    out = superlinear_attention(args["q1"][:, :, :6], args["q2"][:, :, :6], args["k"], args["v"], pos, args["cfg"],
                                mask, backend="torch")
    ref = superlinear_attention(args["q1"][:, :, :6], args["q2"][:, :, :6], args["k"], args["v"], pos, args["cfg"],
                                mask, backend="oracle")
    assert_close("out", ref, out, 1e-5)
