"""Dense attention weights of superlinear attention, for the tools people already use (bertviz, CircuitsVis).

Superlinear attention's output for query q is Σ_k g_k · softmax over (span_k ∪ window) of q·K/√D, applied to V —
so it *is* attention with the weights  P[q, j] = Σ_k g_k · softmax_{S_k ∪ Wnd}(q·K/√D)[j]  (0 outside every span
and the window). `pattern_from_qkv` computes P from a layer's q/k and its routing; `attention_pattern` runs a
converted model and returns P for a slice of queries:

* bertviz: ``head_view(bertviz_attention(model, ids), tokens)`` (a tuple of [1, H, L, L], one per converted layer);
* CircuitsVis: ``attention_patterns(tokens=tokens, attention=attention_pattern(model, ids, layer))`` ([H, L, L]).
"""
from __future__ import annotations

import math

import torch

from superlinear_kernels import SpanConfig


def pattern_from_qkv(q2: torch.Tensor, k: torch.Tensor, qstart: torch.Tensor, qend: torch.Tensor,
                     gate: torch.Tensor, positions: torch.Tensor, cfg: SpanConfig, row_start: int = 0) -> torch.Tensor:
    """fp32 [H_Q, L_Q, L_KV]: the dense attention weights of one row.

    Args:
        q2: [H_Q, L_Q, D] attention queries (scaled by 1/sqrt(D) here, as the kernel does).
        k: [H_KV, L_KV, D] keys (H_Q a multiple of H_KV).
        qstart, qend: int [H_Q, L_Q, K] chosen spans (-1 where the slot is invalid); gate: [H_Q, L_Q, K].
        positions: int [L_Q] query positions; cfg: the layer's `SpanConfig`; row_start: first valid key.
    """
    from ..trace import window_bounds

    h_q, l_q, d = q2.shape
    l_kv = k.shape[1]
    keys = k.float().repeat_interleave(h_q // k.shape[0], dim=0)
    logits = (q2.float() @ keys.transpose(-1, -2)) / math.sqrt(d)  # [H, L_Q, L_KV]
    j = torch.arange(l_kv, device=q2.device)
    win = window_bounds(cfg, positions.cpu(), row_start).to(q2.device)  # [L_Q, 2]
    in_window = (j[None, :] >= win[:, :1]) & (j[None, :] <= win[:, 1:]) & (win[:, :1] >= 0)  # [L_Q, L_KV]
    out = torch.zeros(h_q, l_q, l_kv, dtype=torch.float32, device=q2.device)
    for slot in range(qstart.shape[-1]):
        lo, hi = qstart[..., slot, None].long(), qend[..., slot, None].long()
        allowed = ((j >= lo) & (j <= hi) & (lo >= 0)) | in_window[None]
        masked = logits.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(masked, dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0)  # a query with nothing allowed (a padding position)
        out += gate[..., slot, None].float() * weights
    return out


def _run_capturing(model, input_ids: torch.Tensor, layers: list[int]) -> dict:
    from .attention import converted_layers

    states = dict(converted_layers(model))
    missing = [i for i in layers if i not in states]
    if missing:
        raise ValueError(f"layer {missing}: not a converted layer; converted layers are {sorted(states)}")
    got: dict[int, tuple] = {}
    installed = []
    try:
        for i in layers:
            def record(positions, routing, q2, k, i=i):
                got[i] = (positions, routing, q2, k)
            states[i].qkv_recorders.append(record)
            installed.append((states[i].qkv_recorders, record))
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for hooks, fn in installed:
            hooks.remove(fn)
    return {i: (states[i].span_config, *got[i]) for i in layers}


def attention_pattern(model, input_ids: torch.Tensor, layer, queries=None) -> torch.Tensor:
    """fp32 [H_Q, L_Q, L]: the attention weights of converted `layer` (index or ``"layers.<i>.routing"``) for the
    `queries` positions (None: all, giving the square [H, L, L] that CircuitsVis' `attention_patterns` takes).

    `input_ids`: int [1, L] (one row, no padding). Runs one forward of `model` (an `HFModel` or the converted
    transformers model)."""
    hf_model = getattr(model, "hf", model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected an int tensor [1, L], got {tuple(getattr(input_ids, 'shape', ()))}")
    from ..intervene import _layer_index  # the one parser of "layers.<i>[.routing]" names for model layers

    index = _layer_index(hf_model, layer)
    cfg, positions, routing, q2, k = _run_capturing(hf_model, input_ids, [index])[index]
    rows = torch.arange(positions.numel(), device=positions.device)
    if queries is not None:
        wanted = torch.as_tensor(list(queries) if not isinstance(queries, torch.Tensor) else queries,
                                 dtype=torch.int64, device=positions.device)
        if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= positions.numel()):
            raise ValueError(f"queries: positions must lie in [0, {positions.numel()})")
        rows = wanted
    return pattern_from_qkv(q2[0][:, rows], k[0], routing.qstart[0][:, rows], routing.qend[0][:, rows],
                            routing.gate[0][:, rows], positions[rows], cfg).cpu()


def bertviz_attention(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One [1, H, L, L] tensor per converted layer (ascending), the `attention` argument of bertviz' head_view /
    model_view."""
    from .attention import converted_layers

    hf_model = getattr(model, "hf", model)
    layers = [i for i, _ in converted_layers(hf_model)]
    got = _run_capturing(hf_model, input_ids, layers)
    out = []
    for i in layers:
        cfg, positions, routing, q2, k = got[i]
        out.append(pattern_from_qkv(q2[0], k[0], routing.qstart[0], routing.qend[0], routing.gate[0], positions,
                                    cfg).cpu()[None])
    return tuple(out)


class PatternRecorder:
    """Collects dense attention weights of chosen query positions during a capture (a `LayerState.qkv_recorders`
    entry per layer); `result(length)` gives ``{layer: (positions int64 [Lq], weights fp32 [H, Lq, length])}`` —
    what `RoutingTrace.attention_pattern` reads. A position recorded twice keeps its latest recording."""

    def __init__(self, queries):
        self.queries = torch.as_tensor(list(queries) if not isinstance(queries, torch.Tensor) else queries,
                                       dtype=torch.int64).cpu()
        self.rows: dict[int, dict[int, torch.Tensor]] = {}

    def hook(self, index: int, cfg: SpanConfig):
        def record(positions, routing, q2, k):
            pos = positions.detach().cpu()
            sel = torch.isin(pos, self.queries).nonzero().squeeze(1)
            if not sel.numel():
                return
            dev = sel.to(q2.device)
            weights = pattern_from_qkv(q2[0].detach()[:, dev], k[0].detach(), routing.qstart[0][:, dev],
                                       routing.qend[0][:, dev], routing.gate[0].detach()[:, dev], positions[dev],
                                       cfg).cpu()
            store = self.rows.setdefault(index, {})
            for j, p in enumerate(pos[sel].tolist()):
                store[p] = weights[:, j]
        return record

    def result(self, length: int) -> dict:
        out = {}
        for index, store in self.rows.items():
            positions = sorted(store)
            weights = torch.stack([torch.nn.functional.pad(store[p], (0, length - store[p].shape[-1]))
                                   for p in positions], dim=1)
            out[index] = (torch.tensor(positions, dtype=torch.int64), weights)
        return out
