"""Geometry: the exact stripe table, window, M(x), span lengths, coverage vectors (docs/algorithm.md §1) and
property tests of the invariants against brute-force enumeration."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from superlinear_kernels import SpanConfig, coverage, query_geometry, stripe_offset, stripe_table
from superlinear_kernels.geometry import max_stripe, span_bounds, span_lengths


# --------------------------------------------------------------------------- the table
def test_offsets_integer_mode_are_powers():
    cfg = SpanConfig(search_power=0.5)
    assert [stripe_offset(cfg, i) for i in range(1, 10)] == [i * i for i in range(1, 10)]
    cube = SpanConfig(search_power=1 / 3)
    assert cube.inv_search_power_int == 3
    assert [stripe_offset(cube, i) for i in range(1, 8)] == [i**3 for i in range(1, 8)]


def test_offsets_release_vectors():
    cfg = SpanConfig(search_power=0.55)
    assert cfg.power_fraction == (11, 20)
    assert [stripe_offset(cfg, i) for i in range(1, 13)] == [1, 3, 7, 12, 18, 25, 34, 43, 54, 65, 78, 91]
    assert stripe_offset(cfg, 65) == 1977
    assert stripe_offset(cfg, 66) == 2033
    assert stripe_offset(cfg, 2048) == 2**20
    assert math.floor(2048 ** (1 / 0.55)) == 2**20 - 1  # why the table is exact integer arithmetic


@pytest.mark.parametrize("p", [0.55, 0.6, 0.4, 2 / 3, 0.75, 0.3])
def test_offsets_match_definition(p):
    cfg = SpanConfig(search_power=p)
    u, v = cfg.power_fraction
    table = stripe_table(cfg, 5000).tolist()
    assert table[0] == 0 and table[1] == 1
    for i in range(1, len(table)):
        n = table[i]
        assert n**u <= i**v < (n + 1) ** u, f"F({i}) = {n} violates max{{n : n^{u} <= {i}^{v}}}"
        if i > 1:
            assert table[i] > table[i - 1]
    assert table[-1] > 5000 >= table[-2]


def test_float_power_must_be_a_small_fraction():
    with pytest.raises(ValueError, match="search_power"):
        SpanConfig(search_power=math.pi / 4)


@pytest.mark.parametrize(
    "field,value",
    [("search_power", 1.0), ("search_power", 0.0), ("span_power", 1.5), ("span_power", float("nan")),
     ("backward_factor", 0.0), ("backward_factor", float("inf")), ("forward_factor", -0.5),
     ("num_spans", 0), ("num_spans", 2.0), ("sw_index", -1), ("sw_index", True)],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SpanConfig(**{field: value})


def test_kernel_args_need_exactly_one_power():
    assert SpanConfig.from_kernel_args().search_power == 0.5
    assert SpanConfig.from_kernel_args(inv_search_power_int=3).inv_search_power_int == 3
    with pytest.raises(ValueError, match="exactly one"):
        SpanConfig.from_kernel_args(search_power=0.5, inv_search_power_int=2)
    with pytest.raises(ValueError, match="inv_search_power_int"):
        SpanConfig.from_kernel_args(inv_search_power_int=7)


def test_config_round_trip_and_presets():
    for cfg in (SpanConfig(), SpanConfig.default(), SpanConfig.release()):
        assert SpanConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        SpanConfig.from_dict({"window": 3})
    assert SpanConfig.default().topk == 2


# --------------------------------------------------------------------------- window, M, spans
@pytest.mark.parametrize("cfg,w", [(SpanConfig(sw_index=0), 0), (SpanConfig(sw_index=3), 15),
                                   (SpanConfig.default(), 15), (SpanConfig.release(), 2032)])
def test_window_len(cfg, w):
    assert cfg.window_len == w


@pytest.mark.parametrize("t,stripes,b,fw", [(8192, 77, 427, 143), (131072, 587, 1958, 653),
                                            (1048576, 1983, 6144, 2048), (10485760, 7201, 21800, 7267)])
def test_release_worked_numbers(t, stripes, b, fw):
    cfg = SpanConfig.release()
    backward, forward = span_lengths(cfg, t)
    assert max_stripe(cfg, t) - cfg.sw_index == stripes
    assert (int(backward[t]), int(forward[t])) == (b, fw)


def test_exact_products_stay_exact():
    backward, forward = span_lengths(SpanConfig(backward_factor=2.0, span_power=0.5), 16)
    assert int(backward[16]) == 8 and int(forward[16]) == 0


def test_max_stripe_integer_root():
    cfg = SpanConfig(search_power=0.5)
    for x in [0, 1, 3, 4, 15, 16, 17, 10**6, 10**6 - 1]:
        assert max_stripe(cfg, x) == (math.isqrt(x) if x >= 1 else 0)


def test_span_bounds_invalid_anchor_and_window_clamp():
    cfg = SpanConfig(sw_index=3, forward_factor=5.0)  # W = 15, a large forward part hits the window
    q = torch.tensor(100)
    qs, qe = span_bounds(cfg, torch.tensor([84, -1]), q, torch.tensor(0), 200)
    assert qs.tolist()[1] == -1 and qe.tolist()[1] == -1
    assert qe.tolist()[0] == 100 - 15  # sw_start(q) - 1


# --------------------------------------------------------------------------- coverage vectors
@pytest.mark.parametrize(
    "cfg,length,start,gap",
    [
        (SpanConfig(sw_index=0, backward_factor=2.0), 3000, 0, None),
        (SpanConfig(sw_index=0, backward_factor=2.0), 3000, 100, None),
        *[(SpanConfig(sw_index=s, backward_factor=2.0), 3000, 0, None) for s in range(1, 9)],
        (SpanConfig(sw_index=0, backward_factor=1.9), 3000, 0, (898, 0)),
        (SpanConfig(sw_index=3, backward_factor=1.0, forward_factor=1.0), 3000, 0, (21, 0)),
        (SpanConfig(sw_index=0, backward_factor=2.0, search_power=1 / 3), 3000, 0, (17, 0)),
        (SpanConfig.release(), 6000, 0, None),
    ],
)
def test_coverage_vectors(cfg, length, start, gap):
    report = coverage(cfg, length, start=start)
    assert report.ok == (gap is None)
    if gap is not None:
        assert report.first_gap == (gap[0] + start, gap[1] + start)


def test_presets_cover_a_million_tokens():
    assert coverage(SpanConfig.default(), 2**20).ok
    assert coverage(SpanConfig.release(), 2**20).ok


def test_coverage_rejects_bad_length():
    with pytest.raises(ValueError, match="length"):
        coverage(SpanConfig.default(), 0)


# --------------------------------------------------------------------------- properties
fractions = st.sampled_from([0.5, 1 / 3, 0.55, 0.6, 2 / 3, 0.45, 0.75])
configs = st.builds(
    SpanConfig,
    sw_index=st.integers(0, 6),
    num_spans=st.integers(1, 4),
    backward_factor=st.sampled_from([0.5, 1.0, 1.5, 1.9, 2.0, 2.5, 3.0]),
    forward_factor=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    span_power=st.sampled_from([0.3, 0.45, 0.5, 0.55, 0.7]),
    search_power=fractions,
)


@settings(max_examples=150, deadline=None)
@given(cfg=configs, q=st.integers(0, 400), start=st.integers(0, 60))
def test_geometry_invariants(cfg, q, start):
    geo = query_geometry(cfg, q, start)
    w = cfg.window_len
    first_stripe = cfg.sw_index + 1
    for stripe in geo.stripes:
        assert stripe.anchor <= q
        assert stripe.anchor == q + 1 - stripe.offset
        if stripe.index == first_stripe:
            assert stripe.anchor == q - w  # the first stripe sits right before an unclamped window
        if stripe.candidate:
            assert start <= stripe.qstart <= stripe.anchor
            assert stripe.qend <= q
            if geo.window is not None:
                assert stripe.qend < geo.window[0], "a span overlaps the window"
        else:
            assert stripe.anchor < start


def _brute_force_first_gap(cfg, length):
    for q in range(length):
        key = query_geometry(cfg, q).first_uncovered()
        if key is not None:
            return (q, key)
    return None


@settings(max_examples=80, deadline=None)
@given(cfg=configs, length=st.integers(1, 250))
def test_coverage_matches_brute_force(cfg, length):
    report = coverage(cfg, length)
    assert report.first_gap == _brute_force_first_gap(cfg, length)
    assert report.ok == (report.first_gap is None)
