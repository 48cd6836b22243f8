"""`superlinear_attention(..., routing=)`: attending with a given routing (interventions) on the oracle and
torch backends — the searched routing reproduces the normal call, a hand-made one agrees across backends,
and malformed routings are refused with the field and the rule named."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import left_padded_mask, random_inputs
from superlinear_kernels import SpanConfig, SearchResult, span_search, superlinear_attention

CFG = SpanConfig.default()  # W = 15, K = 2
L = 70


def _inputs(b=2, seed=0):
    return random_inputs(b, 4, 2, L, L, 8, seed=seed)


@pytest.mark.parametrize("backend", ["oracle", "torch"])
def test_the_searched_routing_reproduces_the_call(backend):
    q1, q2, k, v = _inputs()
    mask = left_padded_mask(2, L, [0, 9])
    out, r = superlinear_attention(q1, q2, k, v, torch.arange(L), CFG, mask, backend=backend, return_routing=True)
    given = span_search(q1, k, torch.arange(L), CFG, mask, backend=backend)
    again, r2 = superlinear_attention(q1, q2, k, v, torch.arange(L), CFG, mask, backend=backend,
                                      return_routing=True, routing=given)
    assert torch.equal(out, again)
    assert torch.equal(r.gate, r2.gate) and torch.equal(r.qstart, r2.qstart)


def _forced(q1, k, mask):
    """The searched routing with head 1's first slot forced to the span [2, 6] (anchor 6) from query 40 on,
    and head 2's second slot dropped."""
    r = span_search(q1, k, torch.arange(L), CFG, mask, backend="torch")
    qs, qa, qe, val = r.qstart.clone(), r.qanchor.clone(), r.qend.clone(), r.values.clone()
    qs[:, 1, 40:, 0], qa[:, 1, 40:, 0], qe[:, 1, 40:, 0] = 2, 6, 6
    val[:, 1, 40:, 0] = 3.0
    qs[:, 2, :, 1], qa[:, 2, :, 1], qe[:, 2, :, 1] = -1, -1, -1
    val[:, 2, :, 1] = float("-inf")
    return SearchResult(qs, qa, qe, val)


def test_a_hand_made_routing_agrees_across_backends_with_gradients():
    q1, q2, k, v = _inputs(seed=3)
    mask = left_padded_mask(2, L, [0, 2])
    forced = _forced(q1, k, mask)
    results = {}
    for backend in ("oracle", "torch"):
        tensors = [x.clone().requires_grad_() for x in (q2, k, v)]
        values = forced.values.clone().requires_grad_()
        out, r = superlinear_attention(q1, *tensors, torch.arange(L), CFG, mask, backend=backend,
                                       return_routing=True, routing=replace(forced, values=values))
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results[backend] = (out, r, [x.grad for x in tensors] + [values.grad])
    (ref, r_ref, g_ref), (out, r, g) = results["oracle"], results["torch"]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.gate, r_ref.gate, atol=1e-6, rtol=1e-6)
    assert r.qanchor[0, 2, :, 1].eq(-1).all() and r.gate[0, 2, 30, 1] < 1e-6
    for a, b in zip(g_ref, g):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    searched = superlinear_attention(q1, q2, k, v, torch.arange(L), CFG, mask, backend="torch")
    assert not torch.allclose(searched[:, 1, 40:], out[:, 1, 40:].detach())  # the forcing changed head 1
    assert torch.equal(searched[:, 0], out[:, 0].detach())  # and nothing else of the untouched head


@pytest.mark.parametrize("change,match", [
    (lambda r: replace(r, qstart=r.qstart[..., :1]), r"routing.qstart: expected a tensor of shape"),
    (lambda r: replace(r, values=r.values.long()), r"routing.values: dtype"),
    (lambda r: replace(r, qend=r.qend.float()), r"routing.qend: dtype"),
    (lambda r: _set(r, "qend", 60), r"qend <= min\(q, sw_start\(q\) - 1\)"),  # into the window of q = 65
    (lambda r: _set(r, "qstart", 1), r"row start <= qstart"),  # row 1 starts at key 2
    (lambda r: _set(r, "qanchor", 66), r"anchor <= q"),
    (lambda r: _invalid_with_span(r), r"invalid slots .* qstart = qend = -1"),
])
def test_malformed_routings_are_refused(change, match):
    q1, q2, k, v = _inputs(seed=5)
    mask = left_padded_mask(2, L, [0, 2])
    bad = change(_forced(q1, k, mask))
    with pytest.raises((ValueError, TypeError), match=match):
        superlinear_attention(q1, q2, k, v, torch.arange(L), CFG, mask, backend="torch", routing=bad)
    with pytest.raises(TypeError, match="routing: expected a SearchResult"):
        superlinear_attention(q1, q2, k, v, torch.arange(L), CFG, mask, backend="torch", routing=(1, 2))


def _set(r, field, value):
    x = getattr(r, field).clone()
    x[1, 0, 65, 0] = value
    return replace(r, **{field: x})


def _invalid_with_span(r):
    qa = r.qanchor.clone()
    qa[0, 0, 50, 0] = -1
    return replace(r, qanchor=qa)
