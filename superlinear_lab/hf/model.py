"""`HFModel`: a converted transformers causal LM behind the interface `Session`, `SnapshotStore`, traces and the views
use for the project's own `HybridLM` — ``model(ids, cache, start)`` with a static per-session cache, a tokenizer
with ``encode/decode/token_strings/eos_id``, ``routing_layers()``, ``trace(...)``, ``new_cache(max_len)``.

The cache holds K/V only (a transformer has no SSM state): its ``conv_states``/``ssm_states`` are empty tensors, so
checkpoint/rollback/fork/grow and snapshots work unchanged.

Example::

    model = hf.HFModel(hf.convert(LlamaForCausalLM(config), SpanConfig.default()))
    s = Session(model, max_len=512)
    s.append([1, 2, 3]); s.generate(5)
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from ..model.tokenizer import ByteTokenizer
from .attention import attention_modules, check_supported, converted_layers


# --------------------------------------------------------------------------- tokenizers
class IdTokenizer:
    """For a model without a tokenizer (built from a config): ids in, ids out; text cannot be encoded."""

    def __init__(self, vocab_size: int, eos_id: int | None = None):
        self.vocab_size = vocab_size
        self.eos_id = -1 if eos_id is None else int(eos_id)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        raise ValueError("this model has no tokenizer: pass token ids, or build HFModel(model, tokenizer=...)")

    def decode(self, ids, skip_special: bool = False) -> str:
        return " ".join(f"<{int(i)}>" for i in ids)

    def token_strings(self, ids) -> list[str]:
        return [f"<{int(i)}>" for i in ids]


def _ids(value) -> list[int]:
    """An int, a list of ints or None (how configs spell eos_token_id) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class HFTokenizer:
    """A transformers tokenizer seen through `ByteTokenizer`'s interface.

    `eos_ids`: every id that ends a generation — the tokenizer's eos and `extra_eos` (the model's generation
    config may list more, e.g. an end-of-turn token); `eos_id` is the tokenizer's own (-1 if none).
    """

    def __init__(self, tokenizer, extra_eos=()):
        self.tok = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id = -1 if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)
        self.eos_ids = sorted(set(_ids(tokenizer.eos_token_id)) | set(_ids(list(extra_eos))))

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return list(self.tok.encode(text, add_special_tokens=bos))

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_strings(self, ids) -> list[str]:
        return [self.tok.decode([int(i)]) for i in ids]


def _tokenizer_for(model, tokenizer):
    if tokenizer is None:
        if model.config.vocab_size == ByteTokenizer.vocab_size:  # a byte-level model (e.g. the retrofit bench)
            return ByteTokenizer()
        eos = _ids(getattr(model.config, "eos_token_id", None))
        return IdTokenizer(model.config.vocab_size, eos[0] if eos else None)
    if isinstance(tokenizer, (ByteTokenizer, IdTokenizer, HFTokenizer)):
        return tokenizer
    generation = getattr(model, "generation_config", None)
    return HFTokenizer(tokenizer, _ids(getattr(generation, "eos_token_id", None)))


# --------------------------------------------------------------------------- the session cache
@dataclass(frozen=True)
class KVShape:
    """What `SnapshotStore` reads from ``model.cfg`` (a transformer: no Mamba layers, so empty SSM fields)."""

    vocab_size: int
    n_kv_heads: int
    head_dim: int
    config_dict: dict
    mamba_layers: tuple = ()
    conv_dim: int = 0
    conv_kernel: int = 1
    ssm_heads: int = 0
    ssm_head_dim: int = 0
    ssm_state: int = 0

    def to_dict(self) -> dict:
        return self.config_dict


class HFKVCache:
    """Static K/V of one session: keys[j], values[j] [B, H_KV, max_len, D] for the j-th attention layer
    (ascending layer index). conv_states [0, B, 0, 0] and ssm_states [0, B, 0, 0, 0] are empty (no SSM)."""

    def __init__(self, shape: KVShape, n_layers: int, max_len: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device="cpu", _empty: bool = False):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len={max_len!r}: expected an int >= 1")
        self.shape, self.n_layers, self.max_len, self.batch = shape, n_layers, max_len, batch
        self.dtype, self.device = dtype, torch.device(device)
        self.conv_states = torch.zeros(0, batch, 0, 0, dtype=dtype, device=device)
        self.ssm_states = torch.zeros(0, batch, 0, 0, 0, dtype=torch.float32, device=device)
        if _empty:
            return
        kv = (batch, shape.n_kv_heads, max_len, shape.head_dim)
        self.keys = [torch.zeros(kv, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(kv, dtype=dtype, device=device) for _ in range(n_layers)]

    def clone(self, max_len: int | None = None) -> "HFKVCache":
        """An independent copy; with a larger `max_len`, a larger allocation holding the same contents."""
        new_len = self.max_len if max_len is None else max_len
        if new_len < self.max_len:
            raise ValueError(f"max_len={new_len}: a cache can only grow (current {self.max_len})")
        out = HFKVCache(self.shape, self.n_layers, new_len, self.batch, self.dtype, self.device,
                        _empty=new_len == self.max_len)
        if new_len == self.max_len:
            out.keys = [k.clone() for k in self.keys]
            out.values = [v.clone() for v in self.values]
        else:
            for dst, src in zip(out.keys + out.values, self.keys + self.values):
                dst[:, :, : self.max_len].copy_(src)
        return out

    def memory(self) -> dict[str, int]:
        """Bytes by kind: kv (allocated), conv, ssm (both 0)."""
        return {"kv": sum(t.numel() * t.element_size() for t in self.keys + self.values), "conv": 0, "ssm": 0}

    def as_transformers_cache(self, start: int):
        """A transformers `Cache` whose layer j writes new K/V into keys[j]/values[j] at `start`… and returns the
        views [:, :, :end] (no copy of the prefix)."""
        from transformers.cache_utils import Cache

        return Cache(layers=[_BufferLayer(k, v, start) for k, v in zip(self.keys, self.values)])


def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A cache layer over a preallocated buffer [B, H_KV, max_len, D] holding `length` valid positions."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self.buf_k, self.buf_v, self.length = keys, values, length
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]
            self.device, self.dtype = keys.device, keys.dtype
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.buf_k.shape[2]:
                raise ValueError(f"positions {self.length}..{end - 1} do not fit the cache (max_len "
                                 f"{self.buf_k.shape[2]})")
            self.buf_k[:, :, self.length:end] = key_states
            self.buf_v[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self.buf_k[:, :, :end], self.buf_v[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

    return BufferLayer


_BUFFER_LAYER = None


def _BufferLayer(keys, values, length):
    global _BUFFER_LAYER
    if _BUFFER_LAYER is None:
        _BUFFER_LAYER = _buffer_layer_class()
    return _BUFFER_LAYER(keys, values, length)


def _cache_kwarg(model) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# --------------------------------------------------------------------------- the adapter
class HFModel(nn.Module):
    """A converted transformers causal LM with the project's model interface (see the module docstring).

    Args:
        model: the transformers model (after `convert`; a dense one works too, with no routing to trace).
        tokenizer: a transformers tokenizer, a `ByteTokenizer`, or None (the byte tokenizer when the vocabulary
            is exactly its 264 ids, else ids only: `IdTokenizer`).
        model_id: name used by snapshots and the server.
        source: where the weights came from (``{"name": dir name, "files": {file: sha256}}``, fingerprinted).
    """

    def __init__(self, model: nn.Module, tokenizer=None, model_id: str | None = None, source: dict | None = None):
        super().__init__()
        check_supported(model)
        self.hf = model
        self.tokenizer = _tokenizer_for(model, tokenizer)
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        config_dict = json.loads(config.to_json_string(use_diff=False))
        self.cfg = KVShape(config.vocab_size, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                           config_dict)
        self.model_id = model_id or f"hf/{type(model).__name__}"
        self.source = source or {}
        self.token_recorders: list = []
        self._kv_layers = [i for i, _ in attention_modules(model)]
        self._cache_kwarg = _cache_kwarg(model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def routing_layers(self):
        """(layer index, `LayerState`) of every converted layer — the trace protocol."""
        return converted_layers(self.hf)

    def kv_layers(self) -> list[int]:
        """Indices of every attention layer whose K/V the session cache holds (converted or dense)."""
        return list(self._kv_layers)

    def new_cache(self, max_len: int, batch: int = 1) -> HFKVCache:
        return HFKVCache(self.cfg, len(self._kv_layers), max_len, batch, self.dtype, self.device)

    def trace(self, queries=None, profile_queries=None, layers=None,
              pattern_queries=None) -> contextlib.AbstractContextManager:
        """``with model.trace(...) as tr:`` — `RoutingTrace.capture` on this model; `pattern_queries` also records
        the dense attention weights of those positions (`tr.attention_pattern(layer, queries)`)."""
        from ..trace import RoutingTrace

        return RoutingTrace.capture(self, queries=queries, profile_queries=profile_queries, layers=layers,
                                    pattern_queries=pattern_queries)

    def forward(self, ids: torch.Tensor, cache: HFKVCache | None = None, start: int = 0) -> torch.Tensor:
        """Logits fp32 [B, L, vocab] of `ids` [B, L] at positions start … start+L-1 (with `cache`: K/V written
        there; without: the row starts at 0)."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"ids: expected an int tensor [B, L], got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"ids: token ids must lie in [0, {self.cfg.vocab_size})")
        if cache is None and start != 0:
            raise ValueError(f"start={start}: without a cache the row must start at 0")
        length = ids.shape[1]
        positions = torch.arange(start, start + length, device=ids.device)
        for record in list(self.token_recorders):
            record(positions, ids)
        kwargs = {"use_cache": cache is not None}
        if cache is not None:
            if not 0 <= start <= cache.max_len - length:
                raise ValueError(f"positions {start}..{start + length - 1} do not fit the cache "
                                 f"(max_len {cache.max_len})")
            kwargs[self._cache_kwarg] = cache.as_transformers_cache(start)
        out = self.hf(input_ids=ids, **kwargs)
        return out.logits.float()
