"""Interventions: run a model with its routing overridden, to test a hypothesis about a miss.

    with superlinear_lab.intervene(model, force={("layers.1", 2): [anchor]},      # head 2 of layer 1 must choose it
                                   ablate={("layers.3", 0): [0]}):                # head 0 of layer 3 drops slot 0
        logits = model(ids)                                                       # every forward inside is overridden

Keys name a layer and a query head exactly as a `RoutingTrace` does: the layer as ``"layers.<i>"``,
``"layers.<i>.routing"`` or the block index ``i`` of an attention layer, and the head index.

* **force** — a list of targets the head must attend, each an *anchor* position (int: the span around it follows the
  geometry of docs/algorithm.md §1.7, as for a searched stripe) or an explicit *span* ``(start, end)`` (inclusive; clipped to
  keys before the query's window). A target joins a query's chosen branches where it is a valid key for that query
  (anchor <= q, non-empty span) and is not chosen already: it takes an empty slot, else the slot of the lowest-scoring
  branch that was not forced. Its search value — the one the gate softmax sees — is the real score
  ⟨Q1, K(anchor)⟩ (for a span, of its last key): forcing changes *which* spans are read, not how the gate weighs
  them.
* **ablate** — span slots (0 = the best search value, as in the trace) whose branch is dropped: the slot becomes
  invalid, so the gate renormalises over the remaining branches (docs/algorithm.md §3.2). Ablation applies before forcing, so
  ablating slot k and forcing a target replaces branch k with that target.
* **queries** — None (every position) or the query positions the overrides apply to (others are routed normally).

After the overrides the slots are re-sorted by search value (ties → earlier anchor), keeping the `SearchResult`
contract. Overrides are installed on the attention layers' ``routing_overrides`` and always removed on exit, even on
error; traces recorded inside the block hold the overridden routing and list the overrides (``trace.overrides``).
Works with a `HybridLM` or a `Session` (its model).
"""
from __future__ import annotations

import contextlib

import torch

from superlinear_kernels import SearchResult
from superlinear_kernels.geometry import span_bounds, window_bounds


def _layer_index(model, layer) -> int:
    """Block index of an attention layer given as an int, "layers.<i>" or "layers.<i>.routing"."""
    known = [i for i, _ in model.routing_layers()]
    index = layer
    if isinstance(layer, str):
        parts = layer.split(".")
        if parts[0] == "layers" and len(parts) in (2, 3) and parts[1].isdigit() and parts[2:] in ([], ["routing"]):
            index = int(parts[1])
    if isinstance(index, bool) or not isinstance(index, int) or index not in known:
        raise ValueError(f"layer {layer!r}: expected an attention layer as 'layers.<i>', 'layers.<i>.routing' or "
                         f"an int; attention layers of this model are {[f'layers.{i}' for i in known]}")
    return index


def _targets(name: str, key, value, num_spans: int, kind: str) -> list:
    """Validate one force/ablate entry: a list of anchors / (start, end) spans, or of slots."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}[{key!r}]: expected a non-empty list, got {value!r}")
    out = []
    for t in value:
        if kind == "slot":
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_spans:
                raise ValueError(f"{name}[{key!r}]: slot {t!r} is not an int in 0 … {num_spans - 1}")
            out.append(int(t))
        elif isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in t):
            if not 0 <= t[0] <= t[1]:
                raise ValueError(f"{name}[{key!r}]: span {tuple(t)} must satisfy 0 <= start <= end")
            out.append((int(t[0]), int(t[1])))
        elif isinstance(t, int) and not isinstance(t, bool) and t >= 0:
            out.append(int(t))
        else:
            raise ValueError(f"{name}[{key!r}]: target {t!r} is neither an anchor position (int >= 0) nor a "
                             "(start, end) span")
    if kind == "target" and len(out) > num_spans:
        raise ValueError(f"{name}[{key!r}]: {len(out)} targets but a head chooses only K={num_spans} spans")
    return out


class LayerOverride:
    """The overrides of one attention layer: {head: targets} to force and {head: slots} to ablate.

    Called by the layer as ``fn(positions int64 [L], routing [B, H_Q, L, K], q1 [B, H_Q, L, D], k [B, H_KV, L_KV, D])``
    and returns the overridden `SearchResult` (no gate: the layer computes it).
    """

    def __init__(self, index: int, cfg, force: dict, ablate: dict, queries: torch.Tensor | None):
        self.index, self.cfg = index, cfg
        self.force, self.ablate, self.queries = force, ablate, queries

    def describe(self) -> dict:
        """JSON description recorded in traces."""
        heads = sorted(set(self.force) | set(self.ablate))
        return {"layer": f"layers.{self.index}",
                "heads": {str(h): {"force": [list(t) if isinstance(t, tuple) else t for t in self.force.get(h, [])],
                                   "ablate": list(self.ablate.get(h, []))} for h in heads},
                "queries": None if self.queries is None else self.queries.tolist()}

    def __call__(self, positions: torch.Tensor, routing: SearchResult, q1: torch.Tensor, k: torch.Tensor
                 ) -> SearchResult:
        dev = routing.qstart.device
        pos = positions.to(dev, torch.int64)
        rows = torch.ones_like(pos, dtype=torch.bool) if self.queries is None else torch.isin(pos, self.queries.to(dev))
        if not bool(rows.any()):
            return routing
        qs, qa, qe = (t.to(torch.int64).clone() for t in (routing.qstart, routing.qanchor, routing.qend))
        val = routing.values.float().clone()
        group = q1.shape[1] // k.shape[1]
        l_kv = k.shape[2]
        for h, slots in self.ablate.items():
            for slot in slots:
                m = rows[None, :].expand(qs.shape[0], -1)
                for t, fill in ((qs, -1), (qa, -1), (qe, -1)):
                    t[:, h, :, slot] = torch.where(m, torch.full_like(t[:, h, :, slot], fill), t[:, h, :, slot])
                val[:, h, :, slot] = torch.where(m, torch.full_like(val[:, h, :, slot], float("-inf")),
                                                 val[:, h, :, slot])
        forced = torch.zeros_like(qs, dtype=torch.bool)
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        for h, targets in self.force.items():
            for target in targets:
                if isinstance(target, tuple):  # explicit span, clipped to keys before the window
                    lo = torch.full_like(pos, target[0])
                    hi = torch.minimum(torch.full_like(pos, target[1]), pos)
                    if self.cfg.window_len > 0:  # spans end before the window (docs/algorithm.md §1.7)
                        hi = torch.minimum(hi, window_bounds(self.cfg, pos)[0] - 1)
                    anchor = hi
                    ok = (hi >= lo) & (anchor < l_kv)
                else:  # an anchor: its span from the geometry
                    anchor = torch.full_like(pos, target)
                    ok = (anchor <= pos) & (anchor < l_kv)
                    lo, hi = span_bounds(self.cfg, torch.where(ok, anchor, -1), pos, zero, l_kv)
                    ok &= hi >= lo
                ok &= rows
                key = k[:, h // group].float()[:, anchor.clamp(0, l_kv - 1)]  # [B, L, D]
                score = (q1[:, h].float() * key).sum(-1)  # [B, L]: the raw search score of the anchor
                already = ((qs[:, h] == lo[None, :, None]) & (qe[:, h] == hi[None, :, None])).any(-1)
                need = ok[None, :] & ~already  # [B, L]
                # An empty slot first (value -inf), else the lowest-scoring branch that was not forced.
                free = torch.where(forced[:, h], torch.full_like(val[:, h], float("inf")), val[:, h])
                slot = free.argmin(-1, keepdim=True)  # [B, L, 1]
                for t, new in ((qs, lo), (qa, anchor), (qe, hi)):
                    cur = t[:, h].gather(-1, slot).squeeze(-1)
                    t[:, h].scatter_(-1, slot, torch.where(need, new[None, :].expand_as(cur), cur)[..., None])
                cur = val[:, h].gather(-1, slot).squeeze(-1)
                val[:, h].scatter_(-1, slot, torch.where(need, score, cur)[..., None])
                cur = forced[:, h].gather(-1, slot).squeeze(-1)
                forced[:, h].scatter_(-1, slot, (cur | need)[..., None])
        # Keep the contract: slots by value descending, ties → earlier anchor, invalid slots last.
        by_anchor = torch.argsort(torch.where(qa >= 0, qa, torch.full_like(qa, l_kv)), dim=-1, stable=True)
        by_value = torch.argsort(val.gather(-1, by_anchor), dim=-1, descending=True, stable=True)
        order = by_anchor.gather(-1, by_value)
        pick = lambda t: t.gather(-1, order)  # noqa: E731
        return SearchResult(pick(qs).to(torch.int32), pick(qa).to(torch.int32), pick(qe).to(torch.int32), pick(val))


def _model_of(target):
    # A Session holds its model; a model (ours, or a converted transformers model) is used as it is.
    model = target if hasattr(target, "routing_layers") else getattr(target, "model", target)
    if not hasattr(model, "routing_layers"):
        raise TypeError(f"model: expected a HybridLM or a Session, got {type(target).__name__}")
    return model


@contextlib.contextmanager
def intervene(model, force: dict | None = None, ablate: dict | None = None, queries=None):
    """Run every forward of `model` (a `HybridLM` or a `Session`) inside the block with routing overridden.

    Args:
        force: {(layer, head): [anchor or (start, end), ...]} — targets the head must attend (see module docstring).
        ablate: {(layer, head): [slot, ...]} — chosen branches to drop.
        queries: None (all positions) or the query positions the overrides apply to.

    Raises ValueError naming the bad key or value before anything is installed.
    """
    model = _model_of(model)
    layers = dict(model.routing_layers())
    per_layer: dict[int, tuple[dict, dict]] = {}
    for name, spec, kind in (("force", force, "target"), ("ablate", ablate, "slot")):
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise ValueError(f"{name}: expected a dict {{(layer, head): [...]}}, got {type(spec).__name__}")
        for key, value in spec.items():
            if not isinstance(key, tuple) or len(key) != 2:
                raise ValueError(f"{name}: key {key!r} is not a (layer, head) pair like ('layers.1', 2)")
            index = _layer_index(model, key[0])
            heads = layers[index].cfg.n_heads
            head = key[1]
            if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
                raise ValueError(f"{name}: head {head!r} of {key[0]!r} is not an int in 0 … {heads - 1}")
            entry = per_layer.setdefault(index, ({}, {}))[0 if kind == "target" else 1]
            if head in entry:
                raise ValueError(f"{name}: ({key[0]!r}, {head}) given twice (as another name of the same layer)")
            entry[head] = _targets(name, key, value, layers[index].span_config.num_spans, kind)
    if not per_layer:
        raise ValueError("intervene: give force= and/or ablate= (both are empty)")
    rows = None
    if queries is not None:
        rows = torch.as_tensor(list(queries) if not isinstance(queries, torch.Tensor) else queries)
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool or \
                (rows.numel() and int(rows.min()) < 0):
            raise ValueError(f"queries: expected a 1-D sequence of positions >= 0, got {queries!r}")
        rows = rows.to(torch.int64)
    installed = []
    try:
        for index, (f, a) in per_layer.items():
            override = LayerOverride(index, layers[index].span_config, f, a, rows)
            layers[index].routing_overrides.append(override)
            installed.append((layers[index].routing_overrides, override))
        yield [o for _, o in installed]
    finally:
        for hooks, fn in installed:
            for j in range(len(hooks) - 1, -1, -1):
                if hooks[j] is fn:
                    del hooks[j]
                    break
