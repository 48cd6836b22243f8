"""Superlinear attention as a transformers attention implementation (``attn_implementation="superlinear"``).

`register()` adds the name to transformers' `AttentionInterface` (and its mask interface, with the sdpa mask), and
`convert(model, cfg, layers=None, search_query="q")` switches a decoder-only model to it in place: every converted
attention module gets a `LayerState` (``module.superlinear``) holding its `SpanConfig`; modules without one stay
dense (PyTorch sdpa). The layer's own projections and RoPE run unchanged, so the search runs on the rotated q/k the
layer attends with; the attention itself is `superlinear_kernels.superlinear_attention` (backend "auto").

Search query (Q1):
* ``"q"`` (default, training-free): Q1 is the layer's own rotated query, Q2 = Q1 (the pretrained Q·K picks anchors).
* ``"proj"``: a separate projection initialised from the layer's ``q_proj`` (a `SearchQueryProjection` wraps it and
  appends H more heads; RoPE rotates them like the query). `retrofit` trains it.

Queries are the last L_Q keys of the key tensor the layer receives (the model's own `DynamicCache`, a session
cache, or the filled prefix of a `StaticCache`, e.g. ``generate(..., cache_implementation="static")``); padding
must be on the left (the mask is checked, a mismatch is a ValueError). A model's own sliding window (Mistral,
Qwen2's sliding layers) is replaced by superlinear attention in converted layers and kept by dense ones (`convert`).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from superlinear_kernels import SpanConfig, coverage, span_search, superlinear_attention

NAME = "superlinear"
SEARCH_QUERIES = ("q", "proj")
log = logging.getLogger(__name__)


@dataclass
class LayerState:
    """Superlinear settings of one converted attention module (``module.superlinear``).

    Also the trace protocol's layer object (`superlinear_lab.trace`): `span_config` and `routing_recorders`
    (callables ``fn(positions, routing, q1, k)``).
    """

    index: int  # the decoder layer index (module.layer_idx)
    span_config: SpanConfig
    search_query: str  # "q" or "proj"
    heads: int  # H_Q of the layer
    backend: str = "auto"
    active: bool = True  # False: dense attention (the teacher in `retrofit`, `dense(model)`)
    routing_recorders: list = field(default_factory=list)
    # fn(positions, routing, q2, k) with q2 [B, H_Q, L_Q, D] scaled for 1/sqrt(D) (`attention_pattern` uses it)
    qkv_recorders: list = field(default_factory=list)
    # the intervention protocol (`superlinear_lab.intervene`): fn(positions, routing, q1, k) -> SearchResult
    routing_overrides: list = field(default_factory=list)

    @property
    def cfg(self) -> SimpleNamespace:
        """What `superlinear_lab.intervene` reads of a layer besides `span_config`: ``cfg.n_heads``."""
        return SimpleNamespace(n_heads=self.heads)


class SearchQueryProjection(nn.Module):
    """Wraps a layer's ``q_proj``: output [..., 2·H·D] = [q_proj(x), search(x)], so the model's own view/RoPE code
    produces 2H query heads (H attention heads, then H search heads). `search` starts as a copy of `q_proj`."""

    def __init__(self, q_proj: nn.Linear):
        super().__init__()
        self.base = q_proj
        self.search = nn.Linear(q_proj.in_features, q_proj.out_features, bias=q_proj.bias is not None,
                                device=q_proj.weight.device, dtype=q_proj.weight.dtype)
        with torch.no_grad():
            self.search.weight.copy_(q_proj.weight)
            if q_proj.bias is not None:
                self.search.bias.copy_(q_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.base(x), self.search(x)], dim=-1)


# --------------------------------------------------------------------------- registration
def register() -> None:
    """Add "superlinear" to transformers' attention implementations (idempotent).

    Masks for it are sdpa's (`superlinear_mask`); dense layers of a partly converted model run sdpa with them.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, superlinear_mask)


def superlinear_mask(*args, **kwargs):
    """transformers' sdpa mask (4-D bool [B, 1, L_Q, L_KV], or None for a plain causal call), except that None is
    only accepted when the queries are the last L_Q of the L_KV keys (L_Q == L_KV, or one query). sdpa may skip
    the mask of a static cache's first prefill (queries 0…L_Q-1 against a whole max_cache_len buffer, relying on
    sdpa's upper-left causal alignment); superlinear layers read the query positions from the mask, so they get
    one."""
    import inspect

    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if mask is None:
        bound = inspect.signature(sdpa_mask).bind(*args, **kwargs).arguments
        if bound["q_length"] not in (1, bound["kv_length"]):
            kwargs = {**bound, **bound.get("kwargs", {}), "allow_is_causal_skip": False}
            kwargs.pop("kwargs", None)
            mask = sdpa_mask(**kwargs)
    return mask


def replaced_windows(config) -> dict[int, int]:
    """{layer index: W} of the model's own sliding windows that `convert` took out of the model's masks (see
    `convert`, "Sliding windows"); empty for a model without one."""
    spec = getattr(config, "superlinear", None)
    windows = spec.get("sliding_windows", {}) if isinstance(spec, dict) else {}
    return {int(i): int(w) for i, w in windows.items()}


def _dense_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa attention of a layer that runs dense; a layer whose sliding window `convert` took out of the model's
    masks gets it back here: key k is seen by the query at position p iff p - W < k <= p."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = replaced_windows(module.config).get(getattr(module, "layer_idx", None))
    if window is not None:
        l_q, l_kv = query.shape[2], key.shape[2]
        positions = torch.arange(l_kv - l_q, l_kv, device=query.device)[:, None]
        keys = torch.arange(l_kv, device=query.device)[None, :]
        band = (keys <= positions) & (keys > positions - window)  # [L_Q, L_KV]
        if attention_mask is None:
            attention_mask = band[None, None]
        else:
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            attention_mask = allowed & band
        kwargs.pop("is_causal", None)
    kwargs.pop("sliding_window", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def filled_prefix(key: torch.Tensor, value: torch.Tensor, attention_mask, l_q: int):
    """(key, value, mask) cut to the positions a static cache has filled: transformers' `StaticCache` hands every
    layer its whole buffer [B, H_KV, max_cache_len, D] with a mask [B, 1, L_Q, max_cache_len]; the newest query may
    see keys up to its own position, so that position + 1 is the filled length. A dynamic cache (or a session's)
    is returned unchanged."""
    l_kv = key.shape[2]
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4 or attention_mask.shape[-1] != l_kv:
        return key, value, attention_mask
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    seen = allowed[:, 0, -1, :].any(dim=0).nonzero()
    end = int(seen.max()) + 1 if seen.numel() else l_kv
    if end >= l_kv or end < l_q:
        return key, value, attention_mask
    return key[:, :, :end], value[:, :, :end], attention_mask[..., :end]


def _state_from_config(module) -> LayerState | None:
    """A model loaded with ``attn_implementation="superlinear"`` but never passed to `convert`: read the
    ``superlinear`` section of its config (written by `convert`/`save_pretrained`); layers not listed stay dense."""
    spec = getattr(getattr(module, "config", None), "superlinear", None)
    index = getattr(module, "layer_idx", None)
    if not isinstance(spec, dict) or index is None or str(index) not in spec.get("layers", {}):
        return None
    if spec.get("search_query", "q") != "q":
        raise ValueError(f"layer {index}: the config asks for search_query={spec.get('search_query')!r}, whose Q1 "
                         "weights are stored beside the model; load it with superlinear_lab.hf.from_pretrained(path)")
    heads = module.config.num_attention_heads
    return LayerState(index, SpanConfig.from_dict(spec["layers"][str(index)]), "q", heads)


def padding_from_mask(attention_mask, batch: int, l_q: int, l_kv: int) -> torch.Tensor | None:
    """bool [B, L_KV] (True = valid key) from the layer's 4-D mask, or None for a plain causal call.

    The mask must be causal with left padding over queries at positions L_KV - L_Q … L_KV - 1 (what a causal LM
    with a dynamic cache builds, or a static one after `filled_prefix`); anything else (right padding, packed
    sequences) is a ValueError.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise ValueError(f"attention_mask: expected None or a 4-D tensor, got {type(attention_mask).__name__} "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    allowed = allowed[:, 0].expand(batch, l_q, allowed.shape[-1])
    if allowed.shape[-1] != l_kv:
        raise ValueError(f"attention_mask: {allowed.shape[-1]} keys but the layer has L_KV={l_kv}")
    key_valid = allowed[:, -1, :]
    positions = torch.arange(l_kv - l_q, l_kv, device=allowed.device)
    keys = torch.arange(l_kv, device=allowed.device)
    expected = (keys[None, :] <= positions[:, None])[None] & key_valid[:, None, :]
    row_start = (~key_valid).to(torch.int64).cumprod(dim=1).sum(dim=1)
    live = positions[None, :] >= row_start[:, None]  # rows of padding queries may be anything
    if not bool(((allowed == expected) | ~live[..., None]).all()):
        raise ValueError("attention_mask: superlinear layers need a causal mask with left padding (0…0 1…1 per row); "
                         "this one is not (right padding or packed sequences?)")
    return key_valid


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The transformers attention function for "superlinear".

    Args:
        query: [B, H_Q, L_Q, D] rotated queries ([B, 2·H_Q, L_Q, D] with a search projection).
        key, value: [B, H_KV, L_KV, D], the layer's whole key/value cache after this call's update.
        attention_mask: the 4-D mask from the sdpa mask function, or None.
        scaling: the layer's softmax scale (default 1/sqrt(D)).

    Returns:
        (out [B, L_Q, H_Q, D], None). Layers without a `LayerState` (dense layers) run sdpa. Attention dropout is
        not applied on converted layers (retrofit runs in eval mode).
    """
    state = getattr(module, "superlinear", None)
    if state is None:
        state = _state_from_config(module)
        module.superlinear = state if state is not None else False
    key, value, attention_mask = filled_prefix(key, value, attention_mask, query.shape[2])
    if not state or not state.active:
        if state and state.search_query == "proj":
            query = query[:, : state.heads]
        return _dense_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"layer {state.index}: attention with {unsupported} is not supported by "
                                      "superlinear attention")
    batch, h_total, l_q, d = query.shape
    if state.search_query == "proj":
        if h_total != 2 * state.heads:
            raise ValueError(f"layer {state.index}: expected {2 * state.heads} query heads (attention + search), "
                             f"got {h_total}")
        q2, q1 = query[:, : state.heads], query[:, state.heads:]
    else:
        q1 = q2 = query
    scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
    if abs(scale * math.sqrt(d) - 1.0) > 1e-12:  # the kernel scales Q2 by 1/sqrt(D)
        q2 = q2 * (scale * math.sqrt(d))
    if not (q1.dtype == q2.dtype == key.dtype == value.dtype):  # e.g. under autocast: one dtype for the kernel
        q1, q2, key, value = (x.to(query.dtype) for x in (q1, q2, key, value))
    l_kv = key.shape[2]
    positions = torch.arange(l_kv - l_q, l_kv, device=query.device)
    key_valid = padding_from_mask(attention_mask, batch, l_q, l_kv)
    recorders, qkv_recorders = list(state.routing_recorders), list(state.qkv_recorders)
    if not (state.routing_overrides or recorders or qkv_recorders):
        out = superlinear_attention(q1, q2, key, value, positions, state.span_config, key_valid,
                                    backend=state.backend)
        return out.transpose(1, 2).contiguous(), None
    given, backend = None, state.backend
    if state.routing_overrides:  # search, let each override edit the routing, attend with the result
        given = span_search(q1, key, positions, state.span_config, key_valid, backend=state.backend)
        for override in list(state.routing_overrides):
            given = override(positions, given, q1, key)
        backend = backend if backend in ("torch", "oracle") else "torch"  # the Triton kernels search themselves
    out, routing = superlinear_attention(q1, q2, key, value, positions, state.span_config, key_valid,
                                         backend=backend, return_routing=True, routing=given)
    for record in recorders:
        record(positions, routing, q1, key)
    for record in qkv_recorders:
        record(positions, routing, q2, key)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------- conversion
def attention_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, attention module) of every self-attention module that dispatches through the interface."""
    found = {}
    for _, mod in model.named_modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and type(mod).__name__.endswith("Attention") and hasattr(mod, "config"):
            found.setdefault(idx, mod)
    return sorted(found.items())


def check_supported(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """Raise a ValueError/TypeError naming what is missing unless `model` is a decoder-only transformers model whose
    attention goes through `AttentionInterface`. Returns `attention_modules(model)`."""
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:  # pragma: no cover - the hf extra is missing
        raise ImportError("superlinear_lab.hf needs transformers: pip install 'superlinear-lab[hf]'") from exc
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    arch = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{arch}: encoder-decoder models are not supported (config.is_encoder_decoder is True); "
                         "superlinear attention needs a decoder-only causal LM")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{arch}: its attention does not dispatch through transformers' AttentionInterface "
                         "(_supports_attention_backend is False), so 'superlinear' cannot be plugged in")
    if not getattr(config, "is_causal", True):
        raise ValueError(f"{arch}: config.is_causal is False (bidirectional attention); superlinear attention is "
                         "causal")
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{arch}: found no attention module with a `layer_idx` (class name ending in 'Attention')")
    kinds = sorted(set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
    if kinds:
        raise ValueError(f"{arch}: config.layer_types has {kinds}; superlinear attention supports full and "
                         "sliding-window attention layers only")
    return mods


def _model_windows(config, indices: list[int]) -> dict[int, int]:
    """{layer: W} of the layers whose dense attention the model limits to a sliding window of W keys: the
    "sliding_attention" entries of ``config.layer_types`` (Qwen2-style), or every layer when the config has a
    ``sliding_window`` and no layer types (Mistral-style)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return {}
    types = getattr(config, "layer_types", None)
    if types is None:
        return {i: int(window) for i in indices}
    return {i: int(window) for i in indices if i < len(types) and types[i] == "sliding_attention"}


def _replace_windows(model, mods: dict, converted: list[int]) -> dict[int, int]:
    """Take the model's own sliding windows out of its masks and caches (see `convert`); returns {layer: W}."""
    config = model.config
    windows = replaced_windows(config) or _model_windows(config, sorted(mods))
    if not windows:
        return {}
    types = getattr(config, "layer_types", None)
    if types is None:
        config.sliding_window = None  # one mask for all layers: causal; dense layers apply their window themselves
    else:
        for i, w in windows.items():  # per-layer masks: converted layers get the full causal one
            types[i] = "full_attention" if i in converted else "sliding_attention"
            if hasattr(mods[i], "sliding_window"):
                mods[i].sliding_window = None if i in converted else w
    replaced = sorted(set(windows) & set(converted))
    if replaced:
        log.info("%s: the model's sliding window (%s keys) is replaced by superlinear attention in layers %s; "
                 "dense layers keep it", type(model).__name__, sorted(set(windows.values())), replaced)
    return windows


def _per_layer(cfg, indices: list[int]) -> dict[int, SpanConfig]:
    if isinstance(cfg, SpanConfig):
        return {i: cfg for i in indices}
    if isinstance(cfg, dict):
        bad = [k for k in cfg if isinstance(k, bool) or not isinstance(k, int)]
        if bad:
            raise TypeError(f"cfg: keys must be layer indices (int), got {bad[:3]}; pass a SpanConfig or "
                            "{layer index: SpanConfig}")
        unknown = sorted(set(cfg) - set(indices))
        if unknown:
            raise ValueError(f"cfg: layers {unknown} are not converted (converted: {indices})")
        missing = [i for i in indices if i not in cfg]
        if missing:
            raise ValueError(f"cfg: no SpanConfig for layers {missing}; give one per converted layer or one for all")
        for i, c in cfg.items():
            if not isinstance(c, SpanConfig):
                raise TypeError(f"cfg[{i}]: expected a SpanConfig, got {type(c).__name__}")
        return dict(cfg)
    raise TypeError(f"cfg: expected a SpanConfig or {{layer index: SpanConfig}}, got {type(cfg).__name__}")


def convert(model: nn.Module, cfg, layers=None, search_query: str = "q", *, backend: str = "auto",
            allow_gaps: bool = False, coverage_length: int | None = None) -> nn.Module:
    """Switch `model`'s attention layers to superlinear attention, in place; returns the model.

    Args:
        model: a decoder-only transformers model that uses the attention interface (Llama, Qwen2, Mistral,
            GPT-NeoX, ...).
        cfg: one `SpanConfig` for every converted layer, or ``{layer index: SpanConfig}``.
        layers: layer indices to convert (None: the keys of a `cfg` dict, else every attention layer); the
            others stay dense.
        search_query: "q" (Q1 = the layer's query, training-free) or "proj" (a separate Q1 projection initialised
            from ``q_proj``).
        backend: the kernel backend ("auto", "torch", "triton", "oracle").
        allow_gaps: convert even if a `SpanConfig` leaves some key unreachable (coverage fails).
        coverage_length: row length the coverage proof covers (default the model's max_position_embeddings,
            at most 2^20).

    Sliding windows (Mistral's ``sliding_window``, Qwen2's "sliding_attention" layers): superlinear attention
    replaces the model's own window in every converted layer — the layer sees its `SpanConfig`'s window plus the
    spans it routes to, so keys beyond the model's window stay reachable. The model's masks and caches are made
    full-length for that (``config.sliding_window = None`` for a Mistral-style config, ``layer_types[i] =
    "full_attention"`` for a converted layer of a Qwen2-style one); the windows are kept in
    ``config.superlinear["sliding_windows"]`` and every layer that runs dense (not converted, or inside
    `dense(model)`) applies its own window again, so `dense(model)` is still the original model.

    Raises:
        TypeError / ValueError naming the argument (unsupported architecture, unknown layer, a SpanConfig that
        breaks coverage, search_query="proj" on a model without ``q_proj``).
    """
    mods = dict(check_supported(model))
    if search_query not in SEARCH_QUERIES:
        raise ValueError(f"search_query={search_query!r}: expected one of {SEARCH_QUERIES}")
    if layers is None and isinstance(cfg, dict) and all(isinstance(k, int) for k in cfg):
        layers = sorted(cfg)  # {layer: SpanConfig} names the layers to convert
    indices = sorted(mods) if layers is None else sorted(set(int(i) for i in layers))
    unknown = [i for i in indices if i not in mods]
    if unknown:
        raise ValueError(f"layers={list(layers)}: no attention layer {unknown}; this model has {sorted(mods)}")
    per_layer = _per_layer(cfg, indices)
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"{type(model).__name__}: config.attn_logit_softcapping={softcap} — attention logit "
                         "soft-capping is not supported by superlinear attention (its kernels take plain softmax "
                         "scores)")
    sinks = [i for i in indices if getattr(mods[i], "sinks", None) is not None]
    if sinks:
        raise ValueError(f"{type(model).__name__}: layers {sinks} have attention sinks (module.sinks), which "
                         "superlinear attention does not support")
    length = coverage_length or min(int(getattr(model.config, "max_position_embeddings", 4096) or 4096), 1 << 20)
    for i in indices:
        report = coverage(per_layer[i], length)
        if not report.ok:
            msg = (f"cfg for layer {i}: {per_layer[i]} breaks coverage — query {report.first_gap[0]} never reaches "
                   f"key {report.first_gap[1]} (checked {length} tokens)")
            if not allow_gaps:
                raise ValueError(msg + "; pass allow_gaps=True to convert anyway")
            log.warning("%s; converting anyway (allow_gaps=True)", msg)
    if search_query == "proj":
        for i in indices:
            q_proj = getattr(mods[i], "q_proj", None)
            if not isinstance(q_proj, (nn.Linear, SearchQueryProjection)):
                raise ValueError(f"search_query='proj': layer {i} ({type(mods[i]).__name__}) has no separate "
                                 "q_proj Linear to initialise the search projection from (use search_query='q')")
    register()
    windows = _replace_windows(model, mods, indices)
    heads = int(model.config.num_attention_heads)
    for i, mod in mods.items():
        wrapped = isinstance(getattr(mod, "q_proj", None), SearchQueryProjection)
        if i in per_layer and search_query == "proj":
            if not wrapped:
                mod.q_proj = SearchQueryProjection(mod.q_proj)
        elif wrapped:  # back to the layer's own query (its trained Q1 is dropped)
            mod.q_proj = mod.q_proj.base
        mod.superlinear = LayerState(i, per_layer[i], search_query, heads, backend) if i in per_layer else False
    model.set_attn_implementation(NAME)
    model.config.superlinear = {"search_query": search_query,
                                "layers": {str(i): per_layer[i].to_dict() for i in indices}}
    if windows:
        model.config.superlinear["sliding_windows"] = {str(i): w for i, w in sorted(windows.items())}
    _install_trace_protocol(model)
    return model


def converted_layers(model: nn.Module) -> list[tuple[int, LayerState]]:
    """(layer index, `LayerState`) of every converted layer — the trace protocol's ``routing_layers()``."""
    return [(i, mod.superlinear) for i, mod in attention_modules(model) if getattr(mod, "superlinear", None)]


@contextlib.contextmanager
def dense(model: nn.Module):
    """``with dense(model):`` every converted layer runs dense attention (its original function) inside the block."""
    states = [s for _, s in converted_layers(model)]
    before = [s.active for s in states]
    try:
        for s in states:
            s.active = False
        yield model
    finally:
        for s, a in zip(states, before):
            s.active = a


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Kernel backend of every converted layer: "auto", "torch", "triton" or "oracle"."""
    for _, s in converted_layers(model):
        s.backend = backend
    return model


# --------------------------------------------------------------------------- trace protocol on the raw model
def _cache_length(kwargs) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


def _install_trace_protocol(model: nn.Module) -> None:
    """Give the model what `RoutingTrace.capture` reads: ``routing_layers()``, ``token_recorders`` (fed by a
    forward pre-hook with the positions of the call's ids) and ``trace(...)``."""
    if getattr(model, "_superlinear_trace_hook", None) is not None:
        return
    model.token_recorders = []

    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.token_recorders and isinstance(ids, torch.Tensor):
            start = _cache_length(kwargs)
            positions = torch.arange(start, start + ids.shape[-1], device=ids.device)
            for record in list(module.token_recorders):
                record(positions, ids)

    model._superlinear_trace_hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.routing_layers = _BoundToModel(model, converted_layers)
    model.trace = _BoundToModel(model, _trace)


def _trace(model, queries=None, profile_queries=None, layers=None, pattern_queries=None):
    """``with model.trace(...) as tr:`` — `RoutingTrace.capture` on a converted model (`pattern_queries`: also the
    dense attention weights of those positions, `tr.attention_pattern(layer, queries)`)."""
    from ..trace import RoutingTrace

    return RoutingTrace.capture(model, queries=queries, profile_queries=profile_queries, layers=layers,
                                pattern_queries=pattern_queries)


class _BoundToModel:
    """`fn(model, ...)` as an attribute of `model` that follows the model through `copy.deepcopy` (a closure would
    keep pointing at the original)."""

    def __init__(self, model, fn):
        self.model, self.fn = model, fn

    def __call__(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)
