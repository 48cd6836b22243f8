"""`SuperlinearAttentionLayer`: the `*` mixer — two query projections (Q1 search/gate, Q2 attention), shared K/V,
GQA, no RoPE (cache_position is the only positional input, docs/algorithm.md §5.1). Calls `superlinear_attention`."""
from __future__ import annotations

import torch
from torch import nn

from superlinear_kernels import DecodeAttention, span_search, superlinear_attention

from .config import ModelConfig
from .precision import fp32_region


class SuperlinearAttentionLayer(nn.Module):
    """x [B, L, d_model] -> [B, L, d_model] with Superlinear attention over a (static) K/V cache.

    `routing_recorders` is the capture protocol of `superlinear_lab.trace`: while non-empty, each call asks the
    kernel for its routing and hands ``(positions, routing, q1, k_cache)`` to every recorder. The output does not
    depend on whether recorders are present.

    `qkv_recorders` (same idea) receive ``(positions, routing, q2, k_cache)``: the attention queries, for the dense
    attention patterns of `RoutingTrace.capture(pattern_queries=...)`.

    `routing_overrides` is the intervention protocol of `superlinear_lab.intervene`: while non-empty, the layer
    searches, passes the routing through each override ``fn(positions, routing, q1, k_cache) -> SearchResult``
    in turn, and attends with the result (recorders see the overridden routing).
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.span_config = cfg.span
        self.backend = backend
        hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q1_proj = nn.Linear(cfg.d_model, hq * d, bias=False)  # search / gate query (no 1/sqrt(D))
        self.q2_proj = nn.Linear(cfg.d_model, hq * d, bias=False)  # attention query
        self.k_proj = nn.Linear(cfg.d_model, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, cfg.d_model, bias=False)
        self.routing_recorders: list = []
        self.routing_overrides: list = []
        self.qkv_recorders: list = []  # fn(positions, routing, q2, k_cache): attention patterns (`trace`)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_cache: torch.Tensor | None = None,
                value_cache: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d_model]; positions int64 [L] (contiguous, ascending).

        With caches [B, H_KV, max_len, D] the new K/V are written at `positions` and attention reads the whole
        static cache (keys after each query are never read). Without caches, L_KV = L (positions must be 0..L-1).
        """
        q1, q2, k, v = self._project(x)
        length = x.shape[1]
        if key_cache is not None:
            start = int(positions[0])
            key_cache[:, :, start:start + length] = k
            value_cache[:, :, start:start + length] = v
            k, v = key_cache, value_cache
        recorders = list(self.routing_recorders)
        qkv_recorders = list(self.qkv_recorders)
        with fp32_region(x):  # under autocast: search, gate and attention outside it (`precision`)
            out, routing = self._attend(q1, q2, k, v, positions, bool(recorders or qkv_recorders))
        if self.routing_overrides or recorders or qkv_recorders:
            for record in recorders:
                record(positions, routing, q1, k)
            for record in qkv_recorders:
                record(positions, routing, q2, k)
        return self._output(out)

    def _attend(self, q1, q2, k, v, positions, want_routing: bool):
        """(out [B, H_Q, L, D], routing or None): the search (through any overrides) and the attention."""
        if self.routing_overrides:
            routing = span_search(q1, k, positions, self.span_config, backend=self.backend)
            for override in list(self.routing_overrides):
                routing = override(positions, routing, q1, k)
            # A given routing is attended by the torch or oracle backend (the Triton kernels search themselves).
            backend = self.backend if self.backend in ("torch", "oracle") else "torch"
            return superlinear_attention(q1, q2, k, v, positions, self.span_config, backend=backend,
                                         return_routing=True, routing=routing)
        if want_routing:
            return superlinear_attention(q1, q2, k, v, positions, self.span_config, backend=self.backend,
                                         return_routing=True)
        return superlinear_attention(q1, q2, k, v, positions, self.span_config, backend=self.backend), None

    def _project(self, x: torch.Tensor):
        """x [B, L, d_model] -> q1, q2 [B, H_Q, L, D] and k, v [B, H_KV, L, D]."""
        bsz, length, _ = x.shape
        hq, hkv, d = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q1 = self.q1_proj(x).view(bsz, length, hq, d).transpose(1, 2)
        q2 = self.q2_proj(x).view(bsz, length, hq, d).transpose(1, 2)
        k = self.k_proj(x).view(bsz, length, hkv, d).transpose(1, 2)
        v = self.v_proj(x).view(bsz, length, hkv, d).transpose(1, 2)
        return q1, q2, k, v

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H_Q, L, D] -> [B, L, d_model]."""
        bsz, hq, length, d = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(bsz, length, hq * d))

    def decode_entry(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> DecodeAttention:
        """The pre-validated one-token attention of this layer over a static cache [B, H_KV, max_len, D]."""
        return DecodeAttention(key_cache, value_cache, self.span_config, num_heads=self.cfg.n_heads,
                               backend=self.backend)

    def step(self, x: torch.Tensor, position: torch.Tensor, attend: DecodeAttention) -> torch.Tensor:
        """One token x [B, 1, d_model] at `position` (int64 tensor [1] on x's device, inside the cache; not read
        on the host): its K/V are written into `attend`'s cache there (`index_copy_`, no host read) and it attends
        through `attend` (`decode_entry` on that cache). The same function as ``forward(x, position, caches)``,
        without any host synchronisation, so a CUDA graph can capture it. Hooks (recorders, overrides) are not
        called: callers use `forward` while any is attached."""
        q1, q2, k, v = self._project(x)
        attend.key_cache.index_copy_(2, position, k)
        attend.value_cache.index_copy_(2, position, v)
        with fp32_region(x):
            out = attend(q1, q2, position)
        return self._output(out)

