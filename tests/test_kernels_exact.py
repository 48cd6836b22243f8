"""Exactness of the geometry tables against naive references written here (integers and Fractions only,
no helper shared with the code), and backend-vs-oracle cases aimed at the mistakes that used to pass:

* float offsets without the integer correction  -> test_stripe_table_equals_brute_force_count,
  test_routing_where_float_offsets_are_wrong;
* span lengths rounded instead of ceiled       -> test_span_lengths_at_exact_and_near_powers,
  test_routing_with_fractional_span_lengths;
* span lengths computed in float32             -> test_span_lengths_at_exact_and_near_powers,
  test_span_lengths_rho_half_all_t;
* gate softmax over the wrong axis              -> test_gate_is_a_softmax_over_the_slots.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from helpers import random_inputs
from superlinear_kernels import SpanConfig, span_search, stripe_table, superlinear_attention
from superlinear_kernels.geometry import span_lengths


# --------------------------------------------------------------------------- naive references
def _ref_ceil(factor: Fraction, rho: Fraction, t: int) -> int:
    """ceil(factor * t^rho): the least n with n^den(rho) >= (factor^den(rho)) * t^num(rho), by bisection."""
    u, v = rho.numerator, rho.denominator
    target = factor ** v * t ** u  # a Fraction
    lo, hi = -1, 1  # lo^v < target <= hi^v (target >= 0; lo = -1 stands for "nothing below")
    while Fraction(hi) ** v < target:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid >= 0 and Fraction(mid) ** v >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _ref_offsets(u: int, v: int, limit: int) -> list[int]:
    """F(1), F(2), ... <= limit, F(i) = max{n : n^u <= i^v}, each by bisection on integers."""
    out = []
    i = 1
    while True:
        bound = i ** v
        lo, hi = 0, 2
        while hi ** u <= bound:
            hi *= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if mid ** u <= bound else (lo, mid)
        if lo > limit:
            return out
        out.append(lo)
        i += 1


# --------------------------------------------------------------------------- span lengths
# (b_f, f_f, rho, t): exact integer values (t a power that makes b_f t^rho whole) and neighbours of them.
POINTS = [
    (3.0, 1.0, 0.55, 2**20),  # release, last query of a 1M prefill: 6144 / 2048 (float64 gives 6145 / 2049)
    (3.0, 1.0, 0.55, 2**20 - 1), (3.0, 1.0, 0.55, 2**20 + 1), (3.0, 1.0, 0.55, 1),
    (2.0, 0.0, 0.5, 16), (2.0, 0.0, 0.5, 17), (2.0, 1.0, 0.5, 4096), (2.0, 1.0, 0.5, 4_000_000),
    (1.0, 2.0, 0.8, 32), (1.0, 2.0, 0.8, 1024), (1.0, 2.0, 0.8, 2**20), (1.0, 2.0, 0.8, 31),
    (1.9, 0.5, 0.5, 100), (1.9, 0.5, 0.5, 10_000), (2.5, 1.5, 0.5, 64), (3.0, 0.25, 2 / 3, 27),
    (3.0, 0.25, 2 / 3, 1_000_000), (0.75, 1.0, 0.75, 2**16), (0.75, 1.0, 0.75, 3**12), (1.0, 1.0, 0.3, 2**20),
]


@pytest.mark.parametrize("b_f,f_f,rho,t", POINTS)
def test_span_lengths_at_exact_and_near_powers(b_f, f_f, rho, t):
    cfg = SpanConfig(backward_factor=b_f, forward_factor=f_f, span_power=rho)
    backward, forward = span_lengths(cfg, t)
    rho_q = Fraction(rho).limit_denominator(1000)
    expected = (_ref_ceil(Fraction(b_f).limit_denominator(1000), rho_q, t),
                _ref_ceil(Fraction(f_f).limit_denominator(1000), rho_q, t))
    assert (int(backward[t]), int(forward[t])) == expected


def test_release_preset_at_one_million():
    backward, forward = span_lengths(SpanConfig.release(), 2**20)
    assert (int(backward[2**20]), int(forward[2**20])) == (6144, 2048)


@pytest.mark.parametrize("b_f,f_f", [(2.0, 1.0), (3.0, 0.0), (1.9, 1.0)])
def test_span_lengths_rho_half_all_t(b_f, f_f):
    """rho = 1/2, every t <= 2^20: n = B(t) must satisfy (n-1)^2 < b^2 t <= n^2, checked in int64 numpy."""
    t_max = 2**20
    cfg = SpanConfig(backward_factor=b_f, forward_factor=f_f, span_power=0.5)
    backward, forward = span_lengths(cfg, t_max)
    t = np.arange(t_max + 1, dtype=np.int64)
    for factor, got in ((b_f, backward), (f_f, forward)):
        frac = Fraction(factor).limit_denominator(1000)
        a, d = frac.numerator, frac.denominator  # factor^2 t = a^2 t / d^2
        n = got[: t_max + 1].numpy().astype(np.int64)
        lhs = a * a * t
        assert (n * n * d * d >= lhs).all(), "a length is below the value"
        assert ((n - 1) * (n - 1) * d * d < lhs)[n > 0].all(), "a length is above the ceiling"
        assert (n[lhs == 0] == 0).all()


# --------------------------------------------------------------------------- stripe table
@pytest.mark.parametrize("p,t_max", [(0.5, 2**22), (1 / 3, 2**22), (0.55, 2**22), (0.6, 2**22), (0.75, 2**16),
                                     (5 / 6, 2**12)])
def test_stripe_table_equals_brute_force_count(p, t_max):
    """M(t) = #{i >= 1 : F(i) <= t} for every t <= t_max, from offsets found by integer search."""
    frac = Fraction(p).limit_denominator(1000)
    ref = np.array(_ref_offsets(frac.numerator, frac.denominator, t_max), dtype=np.int64)
    count = np.cumsum(np.bincount(ref, minlength=t_max + 1))  # count[t] = #{i : F(i) <= t}
    table = stripe_table(SpanConfig(search_power=p), t_max)
    assert table[1: len(ref) + 1].tolist() == ref.tolist()
    m = torch.searchsorted(table, torch.arange(t_max + 1), right=True) - 1  # M(t) from the table
    assert np.array_equal(m.numpy(), count)


# --------------------------------------------------------------------------- backends vs the naive oracle
def _compare(cfg, l_kv, seed, positions=None):
    q1, q2, k, v = random_inputs(1, 4, 2, l_kv if positions is None else len(positions), l_kv, 8, seed=seed)
    positions = torch.arange(l_kv) if positions is None else torch.tensor(positions)
    ref, r_ref = superlinear_attention(q1, q2, k, v, positions, cfg, backend="oracle", return_routing=True)
    out, r = superlinear_attention(q1, q2, k, v, positions, cfg, backend="torch", return_routing=True)
    for field in ("qanchor", "qstart", "qend"):
        assert torch.equal(getattr(r_ref, field), getattr(r, field)), field
    torch.testing.assert_close(r.gate, r_ref.gate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return r_ref


def test_routing_where_float_offsets_are_wrong():
    # p = 3/4: F(8) = 16 and F(27) = 81 exactly, where floor(8 ** (4/3)) = 15 and floor(27 ** (4/3)) = 80.
    cfg = SpanConfig(sw_index=0, num_spans=3, backward_factor=2.0, span_power=0.5, search_power=0.75)
    routing = _compare(cfg, 120, seed=3)
    offsets = (torch.arange(120)[None, None, :, None] + 1 - routing.qanchor.long())[routing.valid]
    assert {16, 81} <= set(offsets.tolist()), "the test must route through the stripes float64 gets wrong"


def test_routing_with_fractional_span_lengths():
    # b_f t^rho with fractional parts both below and above 1/2 across the row (round != ceil).
    cfg = SpanConfig(sw_index=1, num_spans=2, backward_factor=1.3, forward_factor=0.6, span_power=0.55,
                     search_power=0.5)
    _compare(cfg, 150, seed=5)


def test_gate_is_a_softmax_over_the_slots():
    cfg = SpanConfig(sw_index=0, num_spans=3)
    q1, q2, k, v = random_inputs(2, 2, 1, 40, 40, 8, seed=11)
    for backend in ("oracle", "torch"):
        _, r = superlinear_attention(q1, q2, k, v, torch.arange(40), cfg, backend=backend, return_routing=True)
        logits = torch.where(r.valid, r.values, torch.full_like(r.values, -1e9)).double()
        expected = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        expected = expected / expected.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(r.gate.double(), expected, atol=1e-6, rtol=1e-6)
        assert r.gate.shape[-1] == 3


def test_search_tie_rule_on_the_independent_oracle():
    cfg = SpanConfig(sw_index=0, num_spans=2, search_power=0.75)
    q1, k = torch.ones(1, 1, 30, 4), torch.ones(1, 1, 30, 4)
    for backend in ("oracle", "torch"):
        r = span_search(q1, k, torch.arange(30), cfg, backend=backend)
        # q = 29 (p = 3/4): F(12) = 27, F(13) = 30 (13^4 = 28561 >= 30^3 = 27000), so the two earliest
        # anchors are 30 - 30 = 0 and 30 - 27 = 3; all scores tie, the earlier anchors win.
        assert r.qanchor[0, 0, 29].tolist() == [0, 3], backend


def test_the_oracle_shares_no_code_with_the_backends():
    """The oracle may import only the config and the result containers: no geometry, softmax or backend."""
    import ast
    import importlib

    oracle = importlib.import_module("superlinear_kernels.oracle")
    tree = ast.parse(open(oracle.__file__, encoding="utf-8").read())
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            local.add(node.module)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("superlinear_kernels"):
            local.add(node.module.split(".", 1)[-1])
    assert local <= {"api", "config"}, f"oracle imports {sorted(local)}"
