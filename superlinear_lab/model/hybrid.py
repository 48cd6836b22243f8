"""`HybridLM`, the small hybrid causal LM, and `HybridCache`, its static decoding cache.

Blocks follow `ModelConfig.pattern` ("M" Mamba-2 mixer, "*" superlinear attention), each
``x = x + mixer(norm(x)); x = x + mlp(norm(x))``. `forward(ids, cache, start)` runs any chunk of a row at
positions start … start+L-1: with a cache it writes K/V there and advances the SSM/conv states, so
chunked prefill followed by one-token decode computes the same function as one full forward.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .attention import SuperlinearAttentionLayer
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .precision import head_logits
from .ssm import Mamba2Mixer
from .tokenizer import ByteTokenizer


class HybridCache:
    """Static cache of one session: K/V of every attention layer and the stacked SSM/conv states.

    keys[j], values[j]: [B, H_KV, max_len, D] for the j-th attention layer (model dtype);
    conv_states: [n_mamba, B, conv_dim, conv_kernel-1] (model dtype); ssm_states: [n_mamba, B, H, P, N] (fp32).
    The cache itself has no cursor: the session owns it.
    """

    def __init__(self, cfg: ModelConfig, max_len: int, batch: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", _empty: bool = False):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len={max_len!r}: expected an int >= 1")
        self.cfg = cfg
        self.max_len = max_len
        self.batch = batch
        self.dtype = dtype
        self.device = torch.device(device)
        if _empty:
            return
        kv_shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        n_att, n_mamba = len(cfg.attention_layers), len(cfg.mamba_layers)
        self.keys = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n_att)]
        self.values = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n_att)]
        self.conv_states = torch.zeros(n_mamba, batch, cfg.conv_dim, cfg.conv_kernel - 1, dtype=dtype, device=device)
        self.ssm_states = torch.zeros(n_mamba, batch, cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_state,
                                      dtype=torch.float32, device=device)

    def clone(self, max_len: int | None = None) -> "HybridCache":
        """An independent copy; with `max_len` >= the current one, a larger allocation holding the same prefix."""
        new_len = self.max_len if max_len is None else max_len
        if new_len < self.max_len:
            raise ValueError(f"max_len={new_len}: a cache can only grow (current {self.max_len})")
        out = HybridCache(self.cfg, new_len, self.batch, self.dtype, self.device, _empty=new_len == self.max_len)
        if new_len == self.max_len:
            out.keys = [k.clone() for k in self.keys]
            out.values = [v.clone() for v in self.values]
        else:
            for dst, src in zip(out.keys + out.values, self.keys + self.values):
                dst[:, :, : self.max_len].copy_(src)
        out.conv_states = self.conv_states.clone()
        out.ssm_states = self.ssm_states.clone()
        return out

    def memory(self) -> dict[str, int]:
        """Bytes by kind: kv (allocated), conv, ssm."""
        kv = sum(t.numel() * t.element_size() for t in self.keys + self.values)
        return {"kv": kv, "conv": self.conv_states.numel() * self.conv_states.element_size(),
                "ssm": self.ssm_states.numel() * self.ssm_states.element_size()}


class Block(nn.Module):
    """Pre-norm residual block: mixer then SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, kind: str, backend: str):
        super().__init__()
        self.kind = kind
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg) if kind == "M" else SuperlinearAttentionLayer(cfg, backend)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)


class HybridLM(nn.Module):
    """Hybrid causal LM over `ByteTokenizer` ids. ``model(ids)`` -> logits [B, L, vocab] (fp32).

    Example::

        model = HybridLM(ModelConfig.tiny())
        logits = model(torch.tensor([model.tokenizer.encode("hello")]))
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = ByteTokenizer()
        if cfg.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"vocab_size={cfg.vocab_size}: the byte tokenizer needs >= {self.tokenizer.vocab_size}")
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind, backend) for kind in cfg.pattern)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.token_recorders: list = []  # trace protocol: fn(positions [L], ids [B, L])
        self.model_id = "superlinear-lab/custom"  # set by `load_model`
        self.source: dict = {}  # where the weights came from (fingerprinted by snapshots)
        self.reset_parameters()

    # ------------------------------------------------------------------ init / settings
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deterministic initialisation from `cfg.init_seed` (weights are a function of the config)."""
        gen = torch.Generator().manual_seed(self.cfg.init_seed)
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)  # output projections feed the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "w_down.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * residual_std)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("conv.bias"):
                p.zero_()
            elif name.endswith("weight"):  # norms
                p.fill_(1.0)
        for block in self.blocks:
            if block.kind == "M":
                block.mixer.conv.weight.copy_(torch.randn(block.mixer.conv.weight.shape, generator=gen)
                                              / math.sqrt(self.cfg.conv_kernel))
                block.mixer.reset_ssm_parameters(gen)

    def set_backend(self, backend: str) -> "HybridLM":
        """Attention backend of every layer: "auto", "torch", "triton" or "oracle"."""
        for _, layer in self.routing_layers():
            layer.backend = backend
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def routing_layers(self) -> list[tuple[int, SuperlinearAttentionLayer]]:
        """(block index, attention layer) for every `*` block — the trace protocol."""
        return [(i, b.mixer) for i, b in enumerate(self.blocks) if b.kind == "*"]

    def new_cache(self, max_len: int, batch: int = 1) -> HybridCache:
        return HybridCache(self.cfg, max_len, batch, self.dtype, self.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def trace(self, queries=None, profile_queries=None, layers=None, pattern_queries=None
              ) -> contextlib.AbstractContextManager:
        """``with model.trace(...) as tr:`` — `RoutingTrace.capture` on this model."""
        from ..trace import RoutingTrace

        return RoutingTrace.capture(self, queries=queries, profile_queries=profile_queries, layers=layers,
                                    pattern_queries=pattern_queries)

    def intervene(self, force=None, ablate=None, queries=None) -> contextlib.AbstractContextManager:
        """``with model.intervene(force=..., ablate=...):`` — `superlinear_lab.intervene` on this model."""
        from ..intervene import intervene

        return intervene(self, force=force, ablate=ablate, queries=queries)

    # ------------------------------------------------------------------ forward
    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise ValueError unless `ids` is an integer tensor [B, L] of valid token ids."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point \
                or ids.dtype == torch.bool:
            raise ValueError(f"ids: expected an int tensor [B, L], got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"ids: token ids must lie in [0, {self.cfg.vocab_size}); got min {int(ids.min())}, "
                             f"max {int(ids.max())}")

    def _begin_forward(self, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
        """Check a forward's ids against the cache and return their positions int64 [L] (token recorders run here)."""
        self.check_ids(ids)
        length = ids.shape[1]
        if length == 0:
            raise ValueError("ids: empty sequence")
        if cache is None and start != 0:
            raise ValueError(f"start={start}: without a cache the row must start at 0")
        if cache is not None and not 0 <= start <= cache.max_len - length:
            raise ValueError(f"positions {start}..{start + length - 1} do not fit the cache (max_len {cache.max_len})")
        positions = torch.arange(start, start + length, device=ids.device)
        for record in list(self.token_recorders):
            record(positions, ids)
        return positions

    def forward(self, ids: torch.Tensor, cache: HybridCache | None = None, start: int = 0) -> torch.Tensor:
        """Logits fp32 [B, L, vocab] of `ids` [B, L] at positions start … start+L-1.

        Without `cache` the row starts from empty state (start must be 0). With `cache`, K/V are written at
        those positions and the cache's SSM/conv states are replaced by the advanced ones, so the caller must
        pass the states that belong to position `start` (the session does).
        """
        positions = self._begin_forward(ids, cache, start)
        return self._run(ids, cache, positions, None)

    def decode_entries(self, cache: HybridCache) -> list:
        """One pre-validated `DecodeAttention` per attention layer (in `routing_layers()` order) over `cache`'s
        K/V, for `step`. Valid until the cache is reallocated (`HybridCache.clone(max_len)`)."""
        return [layer.decode_entry(cache.keys[j], cache.values[j]) for j, (_, layer) in enumerate(self.routing_layers())]

    def step(self, ids: torch.Tensor, cache: HybridCache, position: torch.Tensor, entries: list) -> torch.Tensor:
        """One-token forward for decoding loops and CUDA graphs: fp32 logits [B, 1, vocab].

        Args:
            ids: int64 [B, 1] on the model's device, valid token ids (not checked: that would read the device).
            cache: the cache; its conv/SSM states must belong to `position` (as in `forward`).
            position: int64 tensor [1] on the model's device with 0 < position < cache.max_len (not read).
            entries: `decode_entries(cache)`.

        The same function as ``forward(ids, cache, position)`` — bit for bit on the same device — with no host
        synchronisation. Token recorders, routing recorders and overrides are not called (use `forward` while
        any is attached).
        """
        return self._run(ids, cache, position, entries)

    def _run(self, ids: torch.Tensor, cache: HybridCache | None, positions: torch.Tensor, entries) -> torch.Tensor:
        """The blocks over `ids` at `positions`; attention through `entries` (one-token step) when given."""
        bsz, length = ids.shape
        cfg = self.cfg
        x = self.embed(ids)
        att_j = mamba_j = 0
        for block in self.blocks:
            h = block.norm1(x)
            if block.kind == "M":
                if cache is None:
                    conv = h.new_zeros(bsz, cfg.conv_dim, cfg.conv_kernel - 1)
                    ssm = torch.zeros(bsz, cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_state, device=h.device)
                else:
                    conv, ssm = cache.conv_states[mamba_j], cache.ssm_states[mamba_j]
                h, new_conv, new_ssm = block.mixer(h, conv, ssm)
                if cache is not None:
                    cache.conv_states[mamba_j] = new_conv
                    cache.ssm_states[mamba_j] = new_ssm
                mamba_j += 1
            else:
                if entries is not None:
                    h = block.mixer.step(h, positions, entries[att_j])
                elif cache is None:
                    h = block.mixer(h, positions)
                else:
                    h = block.mixer(h, positions, cache.keys[att_j], cache.values[att_j])
                att_j += 1
            x = x + h
            x = x + block.mlp(block.norm2(x))
        x = self.norm_f(x)
        return head_logits(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)
