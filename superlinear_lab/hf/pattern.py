"""Dense attention weights of superlinear attention, for the tools people already use (bertviz, CircuitsVis).

Superlinear attention's output for query q is Σ_k g_k · softmax over (span_k ∪ window) of q·K/√D, applied to V —
so it *is* attention with the weights  P[q, j] = Σ_k g_k · softmax_{S_k ∪ Wnd}(q·K/√D)[j]  (0 outside every span
and the window). The recording and the per-branch softmax live in `superlinear_lab.trace` (``capture(...,
pattern_queries=)``, `RoutingTrace.attention_pattern`, `branch_weights`); these helpers run a converted model once:

* CircuitsVis: ``attention_patterns(tokens=tokens, attention=attention_pattern(model, ids, layer))`` ([H, L, L]);
* bertviz: ``head_view(bertviz_attention(model, ids), tokens)`` (a tuple of [1, H, L, L], one per converted layer).
"""
from __future__ import annotations

import torch


def _check_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected an int tensor [1, L], got {tuple(getattr(input_ids, 'shape', ()))}")


def _traced(model, input_ids: torch.Tensor, pattern_queries, layers=None):
    hf_model = getattr(model, "hf", model)
    with torch.no_grad(), hf_model.trace(queries=pattern_queries, pattern_queries=pattern_queries,
                                         layers=layers) as tr:
        hf_model(input_ids=input_ids)
    return tr


def attention_pattern(model, input_ids: torch.Tensor, layer, queries=None) -> torch.Tensor:
    """fp32 [H_Q, L_Q, L]: the attention weights of converted `layer` (index or ``"layers.<i>.routing"``) for the
    `queries` positions (None: all, the square [H, L, L] CircuitsVis' `attention_patterns` takes).

    `input_ids`: int [1, L] (one row, no padding). Runs one forward of `model` (an `HFModel` or a converted
    transformers model)."""
    from ..intervene import _layer_index  # the one parser of "layers.<i>[.routing]" names for model layers

    _check_ids(input_ids)
    hf_model = getattr(model, "hf", model)
    index = _layer_index(hf_model, layer)
    length = input_ids.shape[1]
    rows = list(range(length)) if queries is None else [int(q) for q in queries]
    if any(not 0 <= q < length for q in rows):
        raise ValueError(f"queries: positions must lie in [0, {length})")
    return _traced(hf_model, input_ids, sorted(set(rows)), layers=[index]).attention_pattern(index, rows)


def bertviz_attention(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One [1, H, L, L] tensor per converted layer (ascending), the `attention` argument of bertviz' head_view /
    model_view."""
    _check_ids(input_ids)
    tr = _traced(model, input_ids, range(input_ids.shape[1]))
    return tuple(tr.attention_pattern(i)[None] for i in tr.layers)
