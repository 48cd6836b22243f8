"""Parameters and inputs at and past their bounds: every SpanConfig field is bounded with a message naming
it, float positions are refused rather than truncated, non-finite values give the same NaN on every
backend, and the one window rule (`geometry.window_bounds`) matches its definition."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import random_inputs
from superlinear_kernels import SpanConfig, coverage, geometry, span_search, superlinear_attention


# --------------------------------------------------------------------------- SpanConfig bounds
@pytest.mark.parametrize("field,value", [
    ("num_spans", 10**5), ("num_spans", 65), ("num_spans", 0),
    ("sw_index", 10**18), ("sw_index", 46_340),  # N = 2: W = (σ+1)^2 - 1 must stay below 2^31 - 1
    ("backward_factor", 1e20), ("backward_factor", 0.0), ("backward_factor", 1e-7),
    ("forward_factor", 1e7), ("forward_factor", -1.0),
    ("backward_factor", math.nan), ("forward_factor", math.inf), ("span_power", math.nan),
    ("search_power", -math.inf), ("span_power", 0.123456789), ("sw_index", 3.0), ("num_spans", True),
])
def test_out_of_range_fields_are_refused_with_their_name(field, value):
    with pytest.raises(ValueError, match=f"SpanConfig.{field}="):
        SpanConfig(**{field: value})


@pytest.mark.parametrize("p", [0.001, 0.02])
def test_tiny_search_powers_refuse_a_window_they_cannot_place(p):
    # F(σ + 1) = (σ + 1)^(1/p) is astronomically far for σ >= 1: refused at construction, not on first use.
    with pytest.raises(ValueError, match=r"SpanConfig.sw_index=1: .*window"):
        SpanConfig(sw_index=1, search_power=p)


@pytest.mark.parametrize("p", [0.001, 0.02])
@pytest.mark.parametrize("backend", ["oracle", "torch"])
def test_tiny_search_powers_without_window_run(p, backend):
    cfg = SpanConfig(sw_index=0, num_spans=2, search_power=p)
    q1, q2, k, v = random_inputs(1, 2, 1, 64, 64, 8)
    out, r = superlinear_attention(q1, q2, k, v, torch.arange(64), cfg, backend=backend, return_routing=True)
    assert torch.isfinite(out).all()
    # Only stripe 1 (offset 1, anchor q) exists below 2^31: one valid slot per query.
    assert r.valid[..., 0].all() and not r.valid[..., 1].any()


def test_largest_allowed_values_are_usable():
    cfg = SpanConfig(sw_index=46_339, num_spans=64, backward_factor=2.0**20, forward_factor=2.0**20)
    assert cfg.window_len == 46_340**2 - 1
    big = SpanConfig.default().replace(num_spans=64, backward_factor=2.0**20, forward_factor=2.0**-20)
    report = coverage(big, 3000)  # used to raise AssertionError for b_f >= 1e20 (int64 overflow)
    assert report.ok
    q1, q2, k, v = random_inputs(1, 1, 1, 40, 40, 8)
    out = superlinear_attention(q1, q2, k, v, torch.arange(40), big, backend="torch")
    ref = superlinear_attention(q1, q2, k, v, torch.arange(40), big, backend="oracle")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_backward_factor_below_one_is_allowed_and_coverage_names_the_gap():
    # docs/algorithm.md §1.2 allows any b_f > 0 and §1.8 makes coverage a checked property, never assumed: b_f = 0.5 with
    # N = 2, σ = 3 is accepted, and coverage() names the first uncovered key. Here t = 20 (q = 19): anchors
    # 20 - 16 = 4 (stripe 4) is the only candidate, B(20) = ceil(0.5 sqrt(20)) = 3, so the span is [1, 4]
    # and key 0 is missed.
    cfg = SpanConfig.default().replace(backward_factor=0.5)
    report = coverage(cfg, 200)
    assert not report.ok and report.first_gap == (19, 0)
    assert coverage(SpanConfig.default(), 200).ok


def test_from_dict_refuses_non_finite_numbers():
    d = SpanConfig.release().to_dict()
    d["span_power"] = float("nan")
    with pytest.raises(ValueError, match="span_power"):
        SpanConfig.from_dict(d)


# --------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("positions", [[0.0, 1.5, 2.0], [0, 1, 2.9], [True, False, True]])
def test_non_integer_cache_positions_raise_type_error_naming_the_argument(positions):
    q1, _, k, _ = random_inputs(1, 1, 1, 3, 8, 4)
    with pytest.raises(TypeError, match="cache_position"):
        span_search(q1, k, positions, SpanConfig.default(), backend="torch")


def test_integer_lists_and_ranges_still_work():
    q1, _, k, _ = random_inputs(1, 1, 1, 3, 8, 4)
    a = span_search(q1, k, [5, 6, 7], SpanConfig.default(), backend="torch")
    b = span_search(q1, k, range(5, 8), SpanConfig.default(), backend="torch")
    assert torch.equal(a.qanchor, b.qanchor)


def test_non_finite_values_give_the_same_nan_on_oracle_and_torch():
    cfg = SpanConfig.default()  # W = 15, K = 2
    q1, q2, k, v = random_inputs(1, 4, 2, 90, 90, 8, seed=21)
    v[0, 0, 30, 3] = float("inf")
    v[0, 1, 70, 0] = float("-inf")
    v[0, 1, 10, 5] = float("nan")
    outs = {}
    for backend in ("oracle", "torch"):
        out, r = superlinear_attention(q1, q2, k, v, torch.arange(90), cfg, backend=backend, return_routing=True)
        assert not torch.isinf(out).any(), f"{backend}: Inf reached the output"
        outs[backend] = (out, r)
    (ref, r_ref), (out, _) = outs["oracle"], outs["torch"]
    nan_rows = torch.isnan(ref).any(-1)
    assert torch.equal(nan_rows, torch.isnan(out).any(-1))
    assert torch.equal(nan_rows, torch.isnan(ref).all(-1))  # a poisoned query is NaN in full
    # Exactly the queries whose window or chosen spans hold a bad key: KV head 0 has key 30, head 1 keys 10, 70.
    bad = {0: [30], 1: [10, 70]}
    expected = torch.zeros_like(nan_rows)
    for h in range(4):
        for q in range(90):
            keys = set(range(max(0, q - 14), q + 1))
            for slot in range(2):
                s, e = int(r_ref.qstart[0, h, q, slot]), int(r_ref.qend[0, h, q, slot])
                if s >= 0:
                    keys |= set(range(s, e + 1))
            expected[0, h, q] = any(j in keys for j in bad[h // 2])
    assert torch.equal(nan_rows, expected)
    assert 0 < int(nan_rows.sum()) < nan_rows.numel()
    torch.testing.assert_close(out[~nan_rows], ref[~nan_rows], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the window rule
@pytest.mark.parametrize("sigma", [0, 1, 3])
def test_window_bounds_match_the_definition(sigma):
    cfg = SpanConfig(sw_index=sigma, search_power=0.5)
    w = (sigma + 1) ** 2 - 1
    q = torch.arange(40)[:, None]
    s = torch.tensor([0, 3, 20, 39, 45])[None, :]
    lo, hi = geometry.window_bounds(cfg, q, s)
    for qi in range(40):
        for si, start in enumerate([0, 3, 20, 39, 45]):
            keys = [j for j in range(qi + 1) if j >= start and j >= qi - w + 1] if w > 0 else []
            got = (int(lo[qi, si]), int(hi[qi, si]))
            assert got == ((keys[0], keys[-1]) if keys else (-1, -1)), (qi, start)
    lo0, hi0 = geometry.window_bounds(cfg, 7)
    assert lo0.dim() == 0 and int(hi0) == (7 if w else -1)
