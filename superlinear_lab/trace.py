"""`RoutingTrace`: what Superlinear attention did in a run — the data contract every view reads.

A trace covers one token row (batch 1) of `length` tokens. For each recorded attention layer and query
head, and for each recorded query position, it holds the routing of docs/algorithm.md §2–3: anchors, span bounds,
search values, gate weights and the sliding-window bounds; optionally the full per-stripe search profile
(every stripe's score, not only the top K) for a chosen subset of queries.

Contract (stable; views and tests rely on it):

* ``trace.length`` — int, tokens in the row (keys 0 … length-1).
* ``trace.row_start`` — int, s: the first valid key (0 without left padding).
* ``trace.queries`` — int64 [Lsel], the recorded query positions, sorted ascending, unique.
* ``trace.layers`` — list[int], model indices of the recorded attention layers, ascending.
  ``trace.names`` — their stable dotted names ``"layers.<i>.routing"``. Every method taking ``layer``
  accepts either form.
* ``trace.cfg(layer)`` — the layer's `SpanConfig`.
* ``trace.tokens`` — list[str] of length `length` (one display string per token) or None;
  ``trace.token_ids`` — int64 [length] (-1 where unknown) or None.
* ``trace.layer(layer)`` → `LayerRouting` with, for H_Q query heads, Lsel queries, K span slots:
    - ``qstart``, ``qanchor``, ``qend``: int32 [H_Q, Lsel, K], -1 in invalid slots (docs/algorithm.md §2.4);
    - ``values``: fp32 [H_Q, Lsel, K] raw search scores, -inf in invalid slots;
    - ``gate``: fp32 [H_Q, Lsel, K], the gate weights (docs/algorithm.md §3.2);
    - ``window``: int64 [Lsel, 2], inclusive window bounds (lo, hi); (-1, -1) when the window is empty;
    - ``profile_queries``: int64 [Lprof] (sorted), ``stripes``: int64 [S] (σ+1 …, nearest anchor first),
      ``stripe_anchors``: int64 [Lprof, S] (q + 1 - F(i), may be < 0), ``stripe_values``: fp32
      [H_Q, Lprof, S] (-inf where not a candidate). Lprof = 0 when no profile was recorded.
    - ``pattern_queries``: int64 [Lpat], ``pattern``: fp32 [H_Q, Lpat, length] — dense attention weights of the
      queries recorded with ``capture(pattern_queries=...)`` (Lpat = 0 otherwise); read them with
      ``trace.attention_pattern(layer, queries)``. `branch_weights` computes one branch's softmax.
* ``trace.model`` — one line naming the model and its weights (`describe_model`), None if unknown;
  ``trace.overrides`` — list of dicts describing routing interventions active while recording (`intervene`).
* Reach (THE rule, `evidence_reach`; evaluation, the debugger and reports use it): ``reach(layer, query, start,
  end)`` → (keys of [start, end] inside each head's branch k = span k ∪ window [H_Q, K], keys inside the union of
  window and chosen spans [H_Q]); ``reached(layer, head, query, key)``, ``reaching_spans(...)``, ``in_window(...)``.
* Helpers: ``key_counts(layer, head=None)``
  (int64 [length] or [H_Q, length]: how many recorded (query, span-or-window) pairs contain each key),
  ``coverage(layer)`` (fp64 [H_Q]: fraction of keys in [row_start, length) reached at least once),
  ``summary()`` (plain dict), ``save(path)`` / ``RoutingTrace.load(path)`` (a directory holding
  ``trace.json`` and ``tensors.safetensors``; never pickle).

Building a trace:

* ``RoutingTrace.from_search(routing, cache_position, cfg, ...)`` — from kernel outputs, no model needed.
* ``capture_routing(model, layers=None)`` — the raw per-layer `SearchResult` of the latest forward (batched
  evaluation and training), through the same recorder protocol.
* ``RoutingTrace.capture(model, queries=None, profile_queries=None)`` — a context manager around a model
  run (also ``model.trace(...)`` / ``session.trace(...)``). It registers recorders on the model's
  attention layers and *always* removes them on exit, even on error; the model computes exactly what it
  computes without them. If a position is recorded twice (e.g. re-appended after a rollback), the latest
  recording wins. The trace is filled when the ``with`` block exits.

Model protocol used by `capture` (implemented by `superlinear_lab.model.HybridLM`):
``model.routing_layers()`` → list of (index, layer) where ``layer.span_config`` is a `SpanConfig` and
``layer.routing_recorders`` is a list of callables ``fn(positions, routing, q1, k)`` (positions int64 [L],
routing a `SearchResult` with gate, q1 [1, H_Q, L, D], k the key cache [1, H_KV, L_KV, D]);
``model.token_recorders`` is a list of callables ``fn(positions, ids)``; ``model.tokenizer`` (optional)
has ``token_strings(ids) -> list[str]``.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from superlinear_kernels import SearchResult, SpanConfig, StripeScores, stripe_scores
from superlinear_kernels.geometry import window_bounds as kernel_window_bounds

FORMAT = "superlinear-lab.routing-trace"
SCHEMA_VERSION = 1
_INT_FIELDS = ("qstart", "qanchor", "qend")
_ROUTING_FIELDS = ("qstart", "qanchor", "qend", "values", "gate")


def layer_name(index: int) -> str:
    """Stable dotted name of an attention layer's routing record: ``layers.<index>.routing``."""
    return f"layers.{index}.routing"


def _gate(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    from superlinear_kernels.softmax import gate_weights

    return gate_weights(values, valid)


def window_bounds(cfg: SpanConfig, queries, row_start: int = 0) -> torch.Tensor:
    """int64 [L, 2]: inclusive sliding-window bounds (lo, hi) of query positions `queries` int [L] (docs/algorithm.md §1.5),
    (-1, -1) where the window is empty — `superlinear_kernels.geometry.window_bounds` stacked as trace rows."""
    lo, hi = kernel_window_bounds(cfg, torch.as_tensor(queries, dtype=torch.int64), row_start)
    return torch.stack([lo, hi], dim=-1)


# --------------------------------------------------------------------------- "was this key reached": the one rule
def _clip(lo: torch.Tensor, hi: torch.Tensor, ev_lo: torch.Tensor, ev_hi: torch.Tensor):
    """Intersect inclusive intervals [lo, hi] (-1 = none) with [ev_lo, ev_hi]; empty ones become (0, -1)."""
    a = torch.maximum(lo, ev_lo)
    b = torch.minimum(hi, ev_hi)
    empty = (lo < 0) | (hi < 0) | (b < a)
    return torch.where(empty, torch.zeros_like(a), a), torch.where(empty, torch.full_like(b, -1), b)


def evidence_reach(qstart: torch.Tensor, qend: torch.Tensor, window: torch.Tensor, ev_start, ev_end
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """How many keys of the evidence range [ev_start, ev_end] (inclusive) each branch attends — THE reach rule.

    A query's branch k attends the keys of its span [qstart_k, qend_k] together with its sliding window
    (docs/algorithm.md §3.3); a key is *reached* when some branch attends it. Every "was it reached" question in the package
    (trace helpers, evaluation recall, the missed-span debugger, reports) is answered from this function.

    Args:
        qstart, qend: int [..., K] chosen span bounds, -1 in invalid slots.
        window: int [..., 2] inclusive window bounds (lo, hi), (-1, -1) when empty; broadcast against [...].
        ev_start, ev_end: int [...] (or scalars), inclusive evidence bounds.

    Returns:
        (per_branch int64 [..., K]: evidence keys inside span k ∪ window (0 for invalid slots whose window misses
        the evidence too — an invalid slot is a window-only branch), reached int64 [...]: evidence keys inside
        the union of the window and every chosen span).
    """
    qs, qe = qstart.to(torch.int64), qend.to(torch.int64)
    lead = torch.broadcast_shapes(qs.shape[:-1], window.shape[:-1], torch.as_tensor(ev_start).shape,
                                  torch.as_tensor(ev_end).shape)
    qs, qe = qs.expand(*lead, qs.shape[-1]), qe.expand(*lead, qe.shape[-1])
    win = torch.as_tensor(window, dtype=torch.int64).expand(*lead, 2)
    es = torch.as_tensor(ev_start, dtype=torch.int64).expand(lead)[..., None]
    ee = torch.as_tensor(ev_end, dtype=torch.int64).expand(lead)[..., None]
    s_lo, s_hi = _clip(qs, qe, es, ee)  # [..., K]
    w_lo, w_hi = _clip(win[..., :1], win[..., 1:], es, ee)  # [..., 1]
    span_n = (s_hi - s_lo + 1).clamp_min(0)
    win_n = (w_hi - w_lo + 1).clamp_min(0)
    both = (torch.minimum(s_hi, w_hi) - torch.maximum(s_lo, w_lo) + 1).clamp_min(0)
    per_branch = span_n + win_n - both
    # Union of the K spans and the window: sort the clipped intervals by start and count each one's keys beyond
    # the furthest end seen so far (a sweep with a running maximum).
    lo = torch.cat([s_lo, w_lo], dim=-1)
    hi = torch.cat([s_hi, w_hi], dim=-1)
    order = torch.argsort(lo, dim=-1, stable=True)
    lo, hi = lo.gather(-1, order), hi.gather(-1, order)
    seen = torch.cat([torch.full_like(hi[..., :1], -1), torch.cummax(hi, dim=-1).values[..., :-1]], dim=-1)
    fresh = (hi - torch.maximum(lo, seen + 1) + 1).clamp_min(0)
    return per_branch, fresh.sum(dim=-1)


def branch_weights(q2: torch.Tensor, k: torch.Tensor, qstart: torch.Tensor, qend: torch.Tensor,
                   window: torch.Tensor) -> torch.Tensor:
    """fp32 [H_Q, L, K, L_KV]: the attention weights of each branch — softmax of q2·K/√D over span k ∪ window
    (docs/algorithm.md §3.3), 0 outside it and for a branch with no key. The gated sum over K is the layer's attention pattern
    (`RoutingTrace.attention_pattern`); one branch's weights on some keys is what it read of them.

    Args:
        q2: [H_Q, L, D] attention queries (unscaled: 1/√D is applied here, as in the kernels).
        k: [H_KV, L_KV, D] keys (H_Q a multiple of H_KV).
        qstart, qend: int [H_Q, L, K] chosen spans, -1 in invalid slots.
        window: int [L, 2] inclusive window bounds, (-1, -1) when empty.
    """
    from superlinear_kernels.softmax import masked_attention

    h_q, length, d = q2.shape
    l_kv = k.shape[1]
    keys = k.float().repeat_interleave(h_q // k.shape[0], dim=0)  # [H_Q, L_KV, D]
    logits = (q2.float() @ keys.transpose(-1, -2)) / d ** 0.5  # [H_Q, L, L_KV]
    j = torch.arange(l_kv, device=q2.device)
    win = window.to(q2.device)
    in_window = (j >= win[:, :1]) & (j <= win[:, 1:]) & (win[:, :1] >= 0)  # [L, L_KV]
    out = []
    dummy = logits.new_zeros(h_q, l_kv, 1)
    for slot in range(qstart.shape[-1]):
        lo, hi = qstart[..., slot, None].long().to(q2.device), qend[..., slot, None].long().to(q2.device)
        allowed = ((j >= lo) & (j <= hi) & (lo >= 0)) | in_window[None]  # [H_Q, L, L_KV]
        _, lse = masked_attention(logits, allowed, dummy)  # the kernels' softmax: lse -inf for an empty set
        weights = torch.where(allowed & torch.isfinite(lse)[..., None], torch.exp(logits - lse[..., None]),
                              torch.zeros_like(logits))
        out.append(weights)
    return torch.stack(out, dim=2)


@dataclass(frozen=True)
class LayerRouting:
    """Routing of one attention layer for the recorded queries (shapes in the module docstring)."""

    index: int  # model layer index
    cfg: SpanConfig  # the layer's geometry
    queries: torch.Tensor  # int64 [Lsel]
    qstart: torch.Tensor  # int32 [H_Q, Lsel, K]
    qanchor: torch.Tensor  # int32 [H_Q, Lsel, K]
    qend: torch.Tensor  # int32 [H_Q, Lsel, K]
    values: torch.Tensor  # fp32 [H_Q, Lsel, K]
    gate: torch.Tensor  # fp32 [H_Q, Lsel, K]
    window: torch.Tensor  # int64 [Lsel, 2]
    profile_queries: torch.Tensor  # int64 [Lprof]
    stripes: torch.Tensor  # int64 [S]
    stripe_anchors: torch.Tensor  # int64 [Lprof, S]
    stripe_values: torch.Tensor  # fp32 [H_Q, Lprof, S]
    pattern_queries: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # [Lpat]
    pattern: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0))  # fp32 [H_Q, Lpat, length]

    @property
    def name(self) -> str:
        return layer_name(self.index)

    @property
    def heads(self) -> int:
        return self.qstart.shape[0]

    @property
    def num_spans(self) -> int:
        return self.qstart.shape[2]

    @property
    def valid(self) -> torch.Tensor:
        """bool [H_Q, Lsel, K]: slots holding a real candidate."""
        return self.qanchor >= 0


def _empty_profile(heads: int) -> dict:
    return dict(profile_queries=torch.zeros(0, dtype=torch.int64), stripes=torch.zeros(0, dtype=torch.int64),
                stripe_anchors=torch.zeros(0, 0, dtype=torch.int64),
                stripe_values=torch.zeros(heads, 0, 0, dtype=torch.float32))


def _as_positions(name: str, positions) -> torch.Tensor:
    if isinstance(positions, torch.Tensor):
        t = positions.detach().to("cpu")
    else:
        t = torch.as_tensor(list(positions))
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected a 1-D sequence of int positions, got {t.dtype} shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name}: positions must be >= 0, got min {int(t.min())}")
    return t


def _latest_unique(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique positions, index of the *last* occurrence of each in `positions`)."""
    n = positions.numel()
    rev = positions.flip(0)
    ordered, idx = torch.sort(rev, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return ordered[first], (n - 1 - idx[first])


class RoutingTrace:
    """Routing of every recorded attention layer, head and query of one token row (see module docstring)."""

    def __init__(self, records: dict[int, LayerRouting], length: int, row_start: int = 0,
                 token_ids: torch.Tensor | None = None, tokens: list[str] | None = None, *,
                 overrides: list[dict] | None = None, model: str | None = None):
        indices = sorted(records)
        queries = records[indices[0]].queries if indices else torch.zeros(0, dtype=torch.int64)
        for i in indices:
            if not torch.equal(records[i].queries, queries):
                raise ValueError(f"layer {i}: recorded queries differ from layer {indices[0]}'s")
        if queries.numel() and int(queries.max()) >= length:
            raise ValueError(f"length={length}: a recorded query sits at position {int(queries.max())}")
        if token_ids is not None and token_ids.numel() != length:
            raise ValueError(f"token_ids: {token_ids.numel()} entries, expected length={length}")
        if tokens is not None and len(tokens) != length:
            raise ValueError(f"tokens: {len(tokens)} entries, expected length={length}")
        self._records = {i: records[i] for i in indices}
        self.length = int(length)
        self.row_start = int(row_start)
        self.queries = queries
        self.token_ids = token_ids
        self.tokens = tokens
        self.overrides = list(overrides or [])  # routing interventions active while recording (`intervene`)
        self.model = model  # which model and weights produced it (`describe_model`), None if unknown

    # ------------------------------------------------------------------ access
    @property
    def layers(self) -> list[int]:
        return list(self._records)

    @property
    def names(self) -> list[str]:
        return [layer_name(i) for i in self._records]

    def _key(self, layer) -> int:
        if isinstance(layer, str):
            parts = layer.split(".")
            if len(parts) == 3 and parts[0] == "layers" and parts[2] == "routing" and parts[1].isdigit():
                layer = int(parts[1])
            else:
                raise KeyError(f"layer {layer!r}: expected an index or a name like 'layers.3.routing'")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer not in self._records:
            raise KeyError(f"layer {layer!r}: not recorded; recorded layers are {self.layers}")
        return layer

    def layer(self, layer) -> LayerRouting:
        """The `LayerRouting` of an attention layer (index or dotted name)."""
        return self._records[self._key(layer)]

    def cfg(self, layer) -> SpanConfig:
        return self.layer(layer).cfg

    def query_index(self, query: int) -> int:
        """Row of `query` in the recorded tensors; KeyError if that position was not recorded."""
        i = int(torch.searchsorted(self.queries, torch.tensor(int(query))))
        if i >= self.queries.numel() or int(self.queries[i]) != int(query):
            raise KeyError(f"query {query}: not recorded (recorded {self.queries.numel()} queries)")
        return i

    # ------------------------------------------------------------------ derived views
    def reach(self, layer, query: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Evidence keys [start, end] (inclusive) attended by `query`, per head — see `evidence_reach`.

        Returns (per_branch int64 [H_Q, K]: keys inside span k ∪ window, reached int64 [H_Q]: keys inside the
        union of the window and every chosen span)."""
        rec = self.layer(layer)
        i = self.query_index(query)
        return evidence_reach(rec.qstart[:, i], rec.qend[:, i], rec.window[i], start, end)

    def reaching_spans(self, layer, head: int, query: int, key: int) -> list[int]:
        """Span slots k (0 = best search value) whose chosen span [qstart, qend] contains `key`."""
        rec = self.layer(layer)
        i = self.query_index(query)
        no_window = torch.full((2,), -1, dtype=torch.int64)
        per_branch, _ = evidence_reach(rec.qstart[head, i], rec.qend[head, i], no_window, key, key)
        return per_branch.nonzero().flatten().tolist()

    def in_window(self, layer, query: int, key: int) -> bool:
        """Whether `key` lies inside the sliding window of `query` (the same for every head)."""
        window = self.layer(layer).window[self.query_index(query)]
        no_span = torch.full((1,), -1, dtype=torch.int64)
        return bool(evidence_reach(no_span, no_span, window, key, key)[1] > 0)

    def reached(self, layer, head: int, query: int, key: int) -> bool:
        """Whether `query` (head `head`) attended `key`: inside its window or one of its chosen spans."""
        return bool(self.reach(layer, query, key, key)[1][head] > 0)

    def attention_pattern(self, layer, queries=None) -> torch.Tensor:
        """fp32 [H_Q, Lq, length]: the dense attention weights Σ_k g_k · softmax over span k ∪ window of each
        recorded pattern query (`capture(..., pattern_queries=...)`), rows in the order of `queries` (default: all
        recorded, ascending). KeyError for a query whose pattern was not recorded."""
        rec = self.layer(layer)
        have = rec.pattern_queries.tolist()
        wanted = have if queries is None else [int(q) for q in queries]
        rows = []
        for q in wanted:
            if q not in have:
                raise KeyError(f"query {q}: no attention pattern recorded for {rec.name} (recorded: {have[:10]}"
                               f"{' …' if len(have) > 10 else ''}); pass pattern_queries= to capture")
            rows.append(have.index(q))
        return rec.pattern[:, rows]

    def key_counts(self, layer, head: int | None = None, include_window: bool = True) -> torch.Tensor:
        """int64 [length] (one head) or [H_Q, length]: recorded (query, span) pairs — plus windows when
        `include_window` — whose key range contains each key. O(Lsel · K + length)."""
        rec = self.layer(layer)
        h = rec.heads
        diff = torch.zeros(h, self.length + 1, dtype=torch.int64)
        valid = rec.valid & (rec.qend >= rec.qstart)
        heads = torch.arange(h)[:, None, None].expand_as(valid)
        ones = torch.ones(int(valid.sum()), dtype=torch.int64)
        diff.index_put_((heads[valid], rec.qstart[valid].long()), ones, accumulate=True)
        diff.index_put_((heads[valid], rec.qend[valid].long() + 1), -ones, accumulate=True)
        if include_window:
            win = rec.window[rec.window[:, 0] >= 0]
            wdiff = torch.zeros(self.length + 1, dtype=torch.int64)
            wones = torch.ones(win.shape[0], dtype=torch.int64)
            wdiff.index_put_((win[:, 0],), wones, accumulate=True)
            wdiff.index_put_((win[:, 1] + 1,), -wones, accumulate=True)
            diff += wdiff
        counts = diff.cumsum(dim=1)[:, : self.length]
        return counts if head is None else counts[head]

    def coverage(self, layer, include_window: bool = True) -> torch.Tensor:
        """fp64 [H_Q]: fraction of keys in [row_start, length) reached by at least one recorded query."""
        counts = self.key_counts(layer, include_window=include_window)[:, self.row_start:]
        if counts.shape[1] == 0:
            return torch.zeros(counts.shape[0], dtype=torch.float64)
        return (counts > 0).double().mean(dim=1)

    def summary(self) -> dict:
        """Plain-Python overview: length, query count and per-layer statistics."""
        layers = {}
        for i, rec in self._records.items():
            valid = rec.valid
            gate_max = rec.gate.max(dim=-1).values if rec.gate.numel() else rec.gate.new_zeros(0)
            span_len = (rec.qend - rec.qstart + 1).clamp_min(0).double()
            layers[layer_name(i)] = {
                "heads": rec.heads,
                "num_spans": rec.num_spans,
                "window_len": rec.cfg.window_len,
                "valid_slot_fraction": float(valid.double().mean()) if valid.numel() else 0.0,
                "mean_gate_max": float(gate_max.mean()) if gate_max.numel() else 0.0,
                "mean_span_len": float(span_len[valid].mean()) if bool(valid.any()) else 0.0,
                "coverage": [round(float(c), 6) for c in self.coverage(i)],
                "profile_queries": int(rec.profile_queries.numel()),
            }
        return {"length": self.length, "row_start": self.row_start, "queries": int(self.queries.numel()),
                "model": self.model, "overrides": self.overrides, "layers": layers}

    def __repr__(self) -> str:
        return (f"RoutingTrace(length={self.length}, queries={self.queries.numel()}, "
                f"layers={self.names})")

    # ------------------------------------------------------------------ construction from kernel outputs
    @classmethod
    def from_search(cls, routing, cache_position, cfg, *, layers=None, stripe_scores=None, profile_queries=None,
                    length: int | None = None, row_start: int = 0, tokens: list[str] | None = None,
                    token_ids=None, batch: int = 0) -> "RoutingTrace":
        """Build a trace from kernel outputs, without a model.

        Args:
            routing: a `SearchResult` (fields [B, H_Q, L_Q, K]), a sequence of them (one per layer) or a dict
                {layer index: SearchResult}. A missing `gate` is computed from `values` (docs/algorithm.md §3.2).
            cache_position: int [L_Q], the query positions of `routing` (shared by all layers).
            cfg: a `SpanConfig`, or one per layer (sequence / dict like `routing`).
            layers: layer indices when `routing` is a sequence (default 0, 1, …).
            stripe_scores: optional `StripeScores` (values [B, H_Q, Lprof, S]) or one per layer.
            profile_queries: int [Lprof], the positions `stripe_scores` were computed for (default:
                `cache_position`).
            length: tokens in the row (default max(cache_position) + 1).
            row_start: s, the first valid key.
            tokens / token_ids: optional display strings / ids, `length` entries.
            batch: which batch row of the outputs to keep.
        """
        if isinstance(routing, SearchResult):
            routing = [routing]
        if isinstance(routing, dict):
            indices = sorted(routing)
            results = [routing[i] for i in indices]
        else:
            results = list(routing)
            indices = list(layers) if layers is not None else list(range(len(results)))
        if len(indices) != len(results):
            raise ValueError(f"layers: {len(indices)} indices for {len(results)} routing results")

        def per_layer(name, value, kind):
            if value is None or isinstance(value, kind):
                return [value] * len(indices)
            if isinstance(value, dict):
                return [value[i] for i in indices]
            value = list(value)
            if len(value) != len(indices):
                raise ValueError(f"{name}: {len(value)} entries for {len(indices)} layers")
            return value

        cfgs = per_layer("cfg", cfg, SpanConfig)
        profiles = per_layer("stripe_scores", stripe_scores, StripeScores)
        positions = _as_positions("cache_position", cache_position)
        length = int(positions.max()) + 1 if length is None else int(length)
        recorder = _Recorder(queries=None, profile_queries=None)
        prof_pos = positions if profile_queries is None else _as_positions("profile_queries", profile_queries)
        for index, res, layer_cfg, prof in zip(indices, results, cfgs, profiles):
            if not isinstance(layer_cfg, SpanConfig):
                raise TypeError(f"cfg for layer {index}: expected a SpanConfig, got {type(layer_cfg).__name__}")
            if res.qstart.shape[2] != positions.numel():
                raise ValueError(f"layer {index}: routing has L_Q={res.qstart.shape[2]} queries but "
                                 f"cache_position has {positions.numel()}")
            recorder.add_routing(index, layer_cfg, positions, res, batch)
            if prof is not None:
                if prof.values.shape[2] != prof_pos.numel():
                    raise ValueError(f"layer {index}: stripe_scores has {prof.values.shape[2]} queries but "
                                     f"profile_queries has {prof_pos.numel()}")
                recorder.add_profile(index, prof_pos, prof, batch)
        ids = None if token_ids is None else _as_positions("token_ids", token_ids)
        return recorder.build(length, row_start, ids, tokens)

    # ------------------------------------------------------------------ capture from a model run
    @classmethod
    @contextlib.contextmanager
    def capture(cls, model, queries=None, profile_queries=None, layers=None, pattern_queries=None):
        """Record the routing of every attention-layer call of `model` inside the ``with`` block.

        Args:
            model: an object following the protocol in the module docstring (e.g. `HybridLM`).
            queries: None (every position) or the positions to record.
            profile_queries: positions whose full stripe-score profile is also recorded (keep it small:
                O(H_Q · S) floats per query and layer).
            layers: None (all attention layers) or the layer indices to record.
            pattern_queries: positions whose dense attention pattern is recorded too (`attention_pattern`;
                O(H_Q · length) floats per query and layer; needs layers with ``qkv_recorders``).

        Yields an empty `RoutingTrace` that is filled in place when the block exits normally. Recorders are
        removed in a ``finally`` clause, so an exception inside the block leaves the model as it was.
        """
        recorder = _Recorder(queries=None if queries is None else _as_positions("queries", queries),
                             profile_queries=None if profile_queries is None
                             else _as_positions("profile_queries", profile_queries))
        chosen = _routing_layers(model, layers)
        trace = cls({}, 0)
        hooks = {index: recorder.layer_hook(index, lay) for index, lay in chosen}
        qkv_hooks = {}
        if pattern_queries is not None:
            wanted = _as_positions("pattern_queries", pattern_queries)
            for index, lay in chosen:
                if not hasattr(lay, "qkv_recorders"):
                    raise ValueError(f"pattern_queries: attention layer {index} has no qkv_recorders (its queries "
                                     "and keys cannot be recorded)")
                qkv_hooks[index] = recorder.pattern_hook(index, lay, wanted)
        with _recorders_installed(model, hooks, recorder.add_tokens, qkv_hooks):
            yield trace
        tokenizer = getattr(model, "tokenizer", None)
        trace.__dict__.update(recorder.build(None, 0, None, None, tokenizer=tokenizer).__dict__)
        trace.model = _describe(model)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write the trace to directory `path` (created; must not exist or be empty):
        ``trace.json`` (metadata, configs, tokens) and ``tensors.safetensors``. Returns the path."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path}: exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"queries": self.queries.contiguous()}
        if self.token_ids is not None:
            tensors["token_ids"] = self.token_ids.contiguous()
        meta_layers = []
        for i, rec in self._records.items():
            name = layer_name(i)
            for f in _ROUTING_FIELDS + ("window", "profile_queries", "stripes", "stripe_anchors", "stripe_values",
                                        "pattern_queries", "pattern"):
                tensors[f"{name}.{f}"] = getattr(rec, f).contiguous()
            meta_layers.append({"index": i, "name": name, "cfg": rec.cfg.to_dict()})
        save_file(tensors, str(path / "tensors.safetensors"))
        meta = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "length": self.length,
                "row_start": self.row_start, "layers": meta_layers, "tokens": self.tokens,
                "overrides": self.overrides, "model": self.model}
        tmp = path / "trace.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path / "trace.json")
        return path

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        """Read a trace written by `save` (validates format, version and shapes)."""
        path = Path(path)
        meta = json.loads((path / "trace.json").read_text())
        if meta.get("format") != FORMAT or meta.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{SCHEMA_VERSION} (format={meta.get('format')!r}, "
                             f"schema_version={meta.get('schema_version')!r})")
        tensors = load_file(str(path / "tensors.safetensors"))
        queries = tensors["queries"]
        records = {}
        for entry in meta["layers"]:
            name, index = entry["name"], int(entry["index"])
            fields = {f: tensors[f"{name}.{f}"] for f in _ROUTING_FIELDS + (
                "window", "profile_queries", "stripes", "stripe_anchors", "stripe_values")}
            for f in ("pattern_queries", "pattern"):  # optional: traces saved before patterns existed lack them
                if f"{name}.{f}" in tensors:
                    fields[f] = tensors[f"{name}.{f}"]
            shape = fields["qstart"].shape
            for f in _ROUTING_FIELDS:
                if fields[f].shape != shape or shape[1] != queries.numel():
                    raise ValueError(f"{path}: {name}.{f} has shape {tuple(fields[f].shape)}, expected {tuple(shape)} "
                                     f"with {queries.numel()} queries")
            records[index] = LayerRouting(index=index, cfg=SpanConfig.from_dict(entry["cfg"]), queries=queries,
                                          **fields)
        return cls(records, meta["length"], meta["row_start"], tensors.get("token_ids"), meta.get("tokens"),
                   overrides=meta.get("overrides"), model=meta.get("model"))


def _describe(model) -> str | None:
    """One line naming a model and its weights (`describe_model`); None for objects that are not such a model."""
    from .model import describe_model

    return describe_model(model) if hasattr(model, "model_id") else None


def _routing_layers(model, layers=None) -> list:
    """(index, layer) of the attention layers of `model` to record; `layers`: None (all) or indices."""
    every = list(model.routing_layers())
    if layers is None:
        return every
    wanted = set(layers)
    chosen = [(i, lay) for i, lay in every if i in wanted]
    if len(chosen) != len(wanted):
        raise ValueError(f"layers={list(layers)}: attention layers of this model are {[i for i, _ in every]}")
    return chosen


@contextlib.contextmanager
def _recorders_installed(model, layer_hooks: dict, token_hook=None, qkv_hooks: dict | None = None):
    """Append `layer_hooks[index]` to each attention layer's `routing_recorders`, `qkv_hooks[index]` to its
    `qkv_recorders` (and `token_hook` to the model's `token_recorders`) for the ``with`` block; always removed on
    exit, by identity (nested recorders share the lists), even when the block raises."""
    layers = dict(model.routing_layers())
    installed = []
    try:
        for index, fn in layer_hooks.items():
            layers[index].routing_recorders.append(fn)
            installed.append((layers[index].routing_recorders, fn))
        for index, fn in (qkv_hooks or {}).items():
            layers[index].qkv_recorders.append(fn)
            installed.append((layers[index].qkv_recorders, fn))
        if token_hook is not None:
            model.token_recorders.append(token_hook)
            installed.append((model.token_recorders, token_hook))
        yield
    finally:
        for hooks, fn in installed:
            for j in range(len(hooks) - 1, -1, -1):
                if hooks[j] is fn:
                    del hooks[j]
                    break


@contextlib.contextmanager
def capture_routing(model, layers=None):
    """Raw routing of the next forward(s), without building a trace (batched evaluation and training use it).

    Yields a dict {layer index: (positions int64 [L], SearchResult [B, H_Q, L, K] with gate, q1 [B, H_Q, L, D],
    k [B, H_KV, L_KV, D])} holding the latest call per layer. Same recorder protocol and the same guarantees
    as `RoutingTrace.capture` (removed on exit, outputs unchanged)."""
    records: dict[int, tuple] = {}

    def hook(index):
        def record(positions, routing, q1, k):
            records[index] = (positions, routing, q1, k)
        return record

    with _recorders_installed(model, {i: hook(i) for i, _ in _routing_layers(model, layers)}):
        yield records


@dataclass
class _LayerParts:
    cfg: SpanConfig
    positions: list = field(default_factory=list)
    routing: dict = field(default_factory=lambda: {f: [] for f in _ROUTING_FIELDS})
    prof_positions: list = field(default_factory=list)
    prof_stripes: list = field(default_factory=list)
    prof_values: list = field(default_factory=list)
    pat_positions: list = field(default_factory=list)
    pat_values: list = field(default_factory=list)


class _Recorder:
    """Accumulates routing chunk by chunk (CPU tensors), then builds one `RoutingTrace`."""

    def __init__(self, queries: torch.Tensor | None, profile_queries: torch.Tensor | None):
        self.queries = queries
        self.profile_queries = profile_queries
        self.parts: dict[int, _LayerParts] = {}
        self.token_positions: list[torch.Tensor] = []
        self.token_values: list[torch.Tensor] = []
        self.overrides: list[dict] = []
        self.max_position = -1

    @staticmethod
    def _select(positions: torch.Tensor, wanted: torch.Tensor | None) -> torch.Tensor:
        if wanted is None:
            return torch.arange(positions.numel())
        return torch.isin(positions, wanted).nonzero().squeeze(1)

    def add_routing(self, index: int, cfg: SpanConfig, positions: torch.Tensor, res: SearchResult, batch: int = 0,
                    rows: torch.Tensor | None = None) -> None:
        positions = positions.detach().cpu().to(torch.int64)
        rows = self._select(positions, self.queries) if rows is None else rows
        self.max_position = max(self.max_position, int(positions.max()) if positions.numel() else -1)
        parts = self.parts.setdefault(index, _LayerParts(cfg))
        if rows.numel() == 0:
            return
        gate = res.gate if res.gate is not None else _gate(res.values, res.qanchor >= 0)
        parts.positions.append(positions[rows])
        for f in _ROUTING_FIELDS:
            t = gate if f == "gate" else getattr(res, f)
            t = t[batch].detach().to("cpu")[:, rows]
            parts.routing[f].append(t.to(torch.int32) if f in _INT_FIELDS else t.float())

    def add_profile(self, index: int, positions: torch.Tensor, prof: StripeScores, batch: int = 0) -> None:
        parts = self.parts[index]
        parts.prof_positions.append(positions.detach().cpu().to(torch.int64))
        parts.prof_stripes.append(prof.stripes.detach().cpu().to(torch.int64))
        parts.prof_values.append(prof.values[batch].detach().cpu().float())

    def add_tokens(self, positions: torch.Tensor, ids: torch.Tensor) -> None:
        self.token_positions.append(positions.detach().cpu().to(torch.int64))
        self.token_values.append(ids.detach().cpu().reshape(-1).to(torch.int64))
        if positions.numel():
            self.max_position = max(self.max_position, int(positions.max()))

    def layer_hook(self, index: int, layer):
        """Recorder for attention layer `index`: its routing, its stripe profile for the chosen queries and a
        description of any routing override active on it (`superlinear_lab.intervene`)."""
        cfg = layer.span_config

        def record(positions, routing, q1, k):
            pos_cpu = positions.detach().cpu().to(torch.int64)
            self.add_routing(index, cfg, pos_cpu, routing)
            for override in getattr(layer, "routing_overrides", ()):
                desc = override.describe()
                if desc not in self.overrides:
                    self.overrides.append(desc)
            if self.profile_queries is not None:
                rows = self._select(pos_cpu, self.profile_queries)
                if rows.numel():
                    rows_dev = rows.to(q1.device)
                    prof = stripe_scores(q1[:, :, rows_dev], k, positions[rows_dev], cfg)
                    self.add_profile(index, pos_cpu[rows], prof)
        return record

    def pattern_hook(self, index: int, layer, wanted: torch.Tensor):
        """qkv recorder of attention layer `index`: the dense attention pattern of the `wanted` positions."""
        cfg = layer.span_config

        def record(positions, routing, q2, k):
            pos_cpu = positions.detach().cpu().to(torch.int64)
            rows = self._select(pos_cpu, wanted)
            if rows.numel() == 0:
                return
            r = rows.to(q2.device)
            window = window_bounds(cfg, pos_cpu[rows])
            weights = branch_weights(q2[0][:, r].detach(), k[0].detach(), routing.qstart[0][:, r],
                                     routing.qend[0][:, r], window)
            pattern = (routing.gate[0][:, r, :, None].float() * weights).sum(dim=2)  # [H_Q, rows, L_KV]
            parts = self.parts.setdefault(index, _LayerParts(cfg))
            parts.pat_positions.append(pos_cpu[rows])
            parts.pat_values.append(pattern.cpu())
        return record

    def build(self, length, row_start, token_ids, tokens, tokenizer=None) -> RoutingTrace:
        if length is None:
            length = self.max_position + 1
        records = {}
        for index, parts in self.parts.items():
            if parts.positions:
                pos = torch.cat(parts.positions)
                queries, keep = _latest_unique(pos)
                fields = {f: torch.cat(parts.routing[f], dim=1)[:, keep] for f in _ROUTING_FIELDS}
            else:
                queries = torch.zeros(0, dtype=torch.int64)
                fields = None
            heads = fields["qstart"].shape[0] if fields else 0
            if fields is None:
                fields = {f: torch.zeros(0, 0, 0, dtype=torch.int32 if f in _INT_FIELDS else torch.float32)
                          for f in _ROUTING_FIELDS}
            profile = _empty_profile(heads)
            if parts.prof_positions:
                profile = self._build_profile(parts, heads)
            if parts.pat_positions:
                pat_q, keep = _latest_unique(torch.cat(parts.pat_positions))
                width = max(length, max(v.shape[-1] for v in parts.pat_values))
                values = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[-1])) for v in parts.pat_values],
                                   dim=1)
                profile.update(pattern_queries=pat_q, pattern=values[:, keep, :length].contiguous())
            records[index] = LayerRouting(index=index, cfg=parts.cfg, queries=queries,
                                          window=window_bounds(parts.cfg, queries, row_start), **fields, **profile)
        if token_ids is None and self.token_positions:
            token_ids = torch.full((length,), -1, dtype=torch.int64)
            pos = torch.cat(self.token_positions)
            vals = torch.cat(self.token_values)
            uniq, keep = _latest_unique(pos)
            inside = uniq < length
            token_ids[uniq[inside]] = vals[keep[inside]]
        if tokens is None and tokenizer is not None and token_ids is not None:
            tokens = tokenizer.token_strings(token_ids.tolist())
        return RoutingTrace(records, max(length, 0), row_start, token_ids, tokens, overrides=self.overrides)

    @staticmethod
    def _build_profile(parts: _LayerParts, heads: int) -> dict:
        from superlinear_kernels import stripe_offset

        n_stripes = max(s.numel() for s in parts.prof_stripes)
        first = parts.cfg.sw_index + 1
        stripes = torch.arange(first, first + n_stripes, dtype=torch.int64)
        padded = []
        for vals in parts.prof_values:  # chunks with fewer stripes: the extra ones are not candidates
            pad = n_stripes - vals.shape[-1]
            padded.append(torch.nn.functional.pad(vals, (0, pad), value=float("-inf")) if pad else vals)
        values = torch.cat(padded, dim=1)
        pos = torch.cat(parts.prof_positions)
        queries, keep = _latest_unique(pos)
        offsets = torch.tensor([stripe_offset(parts.cfg, int(i)) for i in stripes], dtype=torch.int64)
        anchors = queries[:, None] + 1 - offsets[None, :]
        return dict(profile_queries=queries, stripes=stripes, stripe_anchors=anchors, stripe_values=values[:, keep])
