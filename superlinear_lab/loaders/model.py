"""`SuperlinearExpLM`: the Superlinear-Exp hybrid (Nemotron-H layout, docs/algorithm.md §5) built from the transformers
NemotronH modules for ``M`` (Mamba-2), ``E`` (mixture of experts) and ``-`` (MLP) blocks and this project's
`SuperlinearAttentionLayer` for ``*`` blocks (search query Q1, attention query Q2, shared K/V, GQA, no RoPE).

Each block is ``x = x + mixer(norm(x))`` (Nemotron-H blocks hold one mixer each), then a final RMSNorm and the
output head. The model speaks the same protocol as `superlinear_lab.model.HybridLM`, so `Session`,
`SnapshotStore`, `RoutingTrace` and the views work on it unchanged:

* ``model(ids, cache=None, start=0)`` -> fp32 logits [B, L, vocab] at positions start … start+L-1;
* ``model.new_cache(max_len)`` -> a `HybridCache`: K/V [B, H_KV, max_len, D] per attention layer, conv states
  [n_mamba, B, conv_dim, conv_kernel-1] (model dtype) and SSM states [n_mamba, B, H, P, N] (fp32);
* ``routing_layers()``, ``token_recorders``, ``trace(...)``, ``tokenizer``, ``model_id``, ``source``, ``cfg``.

The transformers Mamba-2 mixer reads and writes its states through a cache object; `_MambaStates` is that
object over the `HybridCache` tensors. The states are taken as empty exactly when ``start == 0``, so a forward
is a pure function of (ids, start, the states belonging to `start`): chunked prefill then one-token decode
computes the same function as one full forward, and checkpoint/rollback only need to restore the tensors.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model.attention import SuperlinearAttentionLayer
from ..model.config import ModelConfig
from ..model.hybrid import HybridCache, HybridLM
from ..model.precision import head_logits
from .config import SuperlinearExpConfig


EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
# The Mamba-2 mixer's cache calls (get_conv_state, update_conv_state, ...) that `_MambaStates` answers are those
# of transformers 5.24; 5.17 calls a different interface and silently computes wrong chunked prefills.
MIN_TRANSFORMERS = "5.24"


def _nemotron_modules():
    try:
        import transformers
        from packaging.version import Version
        from transformers.models.nemotron_h import modeling_nemotron_h as m
    except ImportError as e:
        raise ImportError("loading Superlinear-Exp checkpoints needs transformers' NemotronH modules: "
                          "pip install 'superlinear-lab[hf]'") from e
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"transformers {transformers.__version__} is too old for the Superlinear-Exp loader "
                          f"(needs >= {MIN_TRANSFORMERS}): pip install 'superlinear-lab[hf]'")
    return m


def attention_dims(cfg: SuperlinearExpConfig) -> ModelConfig:
    """The `ModelConfig` that sizes a `SuperlinearAttentionLayer` for `cfg` (d_model, heads, head_dim, span).

    Only those fields are read by the layer; ssm_expand = ssm_head_dim = 1 keeps ModelConfig's SSM checks
    trivially satisfied for any hidden size.
    """
    return ModelConfig(vocab_size=cfg.vocab_size, pattern="*", d_model=cfg.hidden_size,
                       n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                       span=cfg.span, ssm_expand=1, ssm_head_dim=1, norm_eps=cfg.layer_norm_epsilon)


class _MambaStates:
    """The cache interface `NemotronHMamba2Mixer` calls, over the stacked states of a `HybridCache`.

    Args:
        cache: the session's `HybridCache`.
        slots: block index -> row of ``cache.conv_states`` / ``cache.ssm_states``.
        has_previous: False at position 0 — the stored states are then ignored (taken as zeros).
    """

    def __init__(self, cache: HybridCache, slots: dict[int, int], has_previous: bool):
        self.cache, self.slots, self.has_previous = cache, slots, has_previous

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """[B, conv_dim, conv_kernel-1] view (updated in place by the one-token path), or None at position 0."""
        return self.cache.conv_states[self.slots[layer_idx]] if self.has_previous else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        """[B, H, P, N] fp32 view (updated in place by the one-token path), or None at position 0."""
        return self.cache.ssm_states[self.slots[layer_idx]] if self.has_previous else None

    def update_conv_state(self, conv_input: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          **kwargs) -> torch.Tensor:
        """conv_input [B, conv_dim, L] -> [B, conv_dim, conv_kernel-1+L]: the stored last inputs (zeros at
        position 0) followed by the new ones, so the causal convolution sees its true left context. The last
        conv_kernel-1 columns become the new state."""
        state = self.cache.conv_states[self.slots[layer_idx]]
        previous = state if self.has_previous else torch.zeros_like(state)
        full = torch.cat([previous.to(conv_input.dtype), conv_input], dim=-1)
        state.copy_(full[..., full.shape[-1] - state.shape[-1]:])
        return full

    def update_recurrent_state(self, recurrent_state: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        """Store the SSM state [B, H, P, N] reached at the end of the chunk."""
        state = self.cache.ssm_states[self.slots[layer_idx]]
        state.copy_(recurrent_state)
        return state


class ExpBlock(nn.Module):
    """One Nemotron-H block: RMSNorm then one mixer, residual. `kind` is its pattern character."""

    def __init__(self, kind: str, norm: nn.Module, mixer: nn.Module):
        super().__init__()
        self.kind = kind
        self.norm = norm
        self.mixer = mixer


class SuperlinearExpLM(nn.Module):
    """Superlinear-Exp hybrid causal LM. ``model(ids)`` -> logits fp32 [B, L, vocab].

    Build it from a config (random or empty weights) or, usually, with `load_checkpoint`.

    Example::

        cfg = SuperlinearExpConfig.released()
        with torch.device("meta"):
            model = SuperlinearExpLM(cfg)       # shapes only, no memory
        model.num_parameters()                  # = cfg.parameter_counts()["total"]
    """

    # The HybridLM protocol methods read only `cfg`, `blocks[i].kind`, `blocks[i].mixer`, `embed`: shared
    # rather than copied, so the two models cannot drift apart.
    routing_layers = HybridLM.routing_layers
    new_cache = HybridLM.new_cache
    trace = HybridLM.trace
    check_ids = HybridLM.check_ids
    _begin_forward = HybridLM._begin_forward
    set_backend = HybridLM.set_backend
    num_parameters = HybridLM.num_parameters
    decode_entries = HybridLM.decode_entries
    dtype = HybridLM.dtype
    device = HybridLM.device

    def __init__(self, cfg: SuperlinearExpConfig, backend: str = "auto", experts_implementation: str = "eager"):
        super().__init__()
        m = _nemotron_modules()
        hf = cfg.to_nemotron_config()
        self.cfg = cfg
        self.hf_config = hf  # shared by the transformers modules
        self.set_experts_implementation(experts_implementation)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        attn_dims = attention_dims(cfg)
        blocks = []
        for i, kind in enumerate(cfg.pattern):
            if kind == "M":
                mixer = m.NemotronHMamba2Mixer(hf, layer_idx=i)
                # transformers clamps dt at time_step_min in the chunked scan but not in the one-token update;
                # the checkpoint's own limit (default (0, inf)) keeps prefill and decode the same function.
                mixer.time_step_limit = cfg.time_step_limit
            elif kind == "E":
                mixer = m.NemotronHMoE(hf, layer_idx=i)
            elif kind == "-":
                mixer = m.NemotronHMLP(hf)
            else:
                mixer = SuperlinearAttentionLayer(attn_dims, backend)
            blocks.append(ExpBlock(kind, m.NemotronHRMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon), mixer))
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = m.NemotronHRMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.token_recorders: list = []  # trace protocol: fn(positions [L], ids [B, L])
        self.tokenizer = None  # set by load_checkpoint (CheckpointTokenizer or IdTokenizer)
        self.model_id = "superlinear-exp/custom"  # set by load_checkpoint
        self.source: dict = {}  # where the weights came from (fingerprinted by snapshots)
        self._mamba_slots = {i: j for j, i in enumerate(cfg.mamba_layers)}

    def set_experts_implementation(self, name: str) -> "SuperlinearExpLM":
        """How MoE blocks run their experts: "eager" (loop over the experts hit; the reference), "batched_mm" or
        "grouped_mm" (transformers' batched kernels, faster on GPUs; equal up to rounding)."""
        if name not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation={name!r}: expected one of {EXPERTS_IMPLEMENTATIONS}")
        self.hf_config._experts_implementation = name
        return self

    # ------------------------------------------------------------------ dtype / init
    def keep_router_fp32(self) -> "SuperlinearExpLM":
        """Hold the MoE router weight and score bias in fp32 whatever the model dtype (as transformers does;
        the router computes in fp32 anyway, and the score correction bias is tiny against the scores)."""
        for block in self.blocks:
            if block.kind == "E":
                block.mixer.gate.float()
        return self

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> "SuperlinearExpLM":
        """Deterministic random weights (for tests and demos): N(0, std) matrices and experts, unit norms,
        Mamba A = -(1…H), D = 1, dt_bias = softplus⁻¹ of steps log-spaced in [1e-3, 1e-1]."""
        gen = torch.Generator().manual_seed(seed)

        def normal(p, scale=std):
            p.copy_(torch.randn(p.shape, generator=gen, device="cpu") * scale)

        for name, p in self.named_parameters():
            if p.dim() >= 2:
                normal(p)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for block in self.blocks:
            if block.kind == "M":
                mixer = block.mixer
                heads = mixer.num_heads
                mixer.A_log.copy_(torch.log(torch.arange(1, heads + 1, dtype=torch.float32, device="cpu")))
                dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), heads, device="cpu"))
                mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                normal(mixer.conv1d.weight, 1 / math.sqrt(mixer.conv_kernel_size))
            elif block.kind == "E":
                normal(block.mixer.gate.e_score_correction_bias, 0.01)
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, cache: HybridCache | None = None, start: int = 0) -> torch.Tensor:
        """Logits fp32 [B, L, vocab] of `ids` [B, L] at positions start … start+L-1.

        Without `cache` the row starts from empty state (start must be 0). With `cache`, K/V are written at those
        positions and the conv/SSM states are advanced in place; the caller passes the states that belong to
        position `start` (the session does).
        """
        positions = self._begin_forward(ids, cache, start)
        return self._run(ids, cache, positions, None, start > 0)

    def step(self, ids: torch.Tensor, cache: HybridCache, position: torch.Tensor, entries: list) -> torch.Tensor:
        """One-token forward for decoding loops and CUDA graphs (as `HybridLM.step`): ids int64 [B, 1], `position`
        an int64 tensor [1] with 0 < position < cache.max_len (neither is read on the host), `entries` =
        `decode_entries(cache)`. fp32 logits [B, 1, vocab]; the same function as ``forward(ids, cache, position)``."""
        return self._run(ids, cache, position, entries, True)

    def _run(self, ids, cache, positions, entries, has_previous: bool) -> torch.Tensor:
        """The blocks over `ids` at `positions` (conv/SSM states taken as empty unless `has_previous`)."""
        states = None if cache is None else _MambaStates(cache, self._mamba_slots, has_previous=has_previous)
        x = self.embed(ids)
        att_j = 0
        for block in self.blocks:
            h = block.norm(x)
            if block.kind == "M":
                h = block.mixer(h, cache=states)
            elif block.kind == "*":
                if entries is not None:
                    h = block.mixer.step(h, positions, entries[att_j])
                elif cache is None:
                    h = block.mixer(h, positions)
                else:
                    h = block.mixer(h, positions, cache.keys[att_j], cache.values[att_j])
                att_j += 1
            elif block.kind == "E" and entries is not None:
                h = self._moe_step(block.mixer, h)
            else:
                h = block.mixer(h)
            x = x + h
        x = self.norm_f(x)
        return head_logits(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)

    def _moe_step(self, moe: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """A MoE block (`NemotronHMoE`) on one token, h [1, 1, hidden], for the one-token step.

        transformers' "eager" experts find the experts hit with a host read (``nonzero`` then ``item``), which a CUDA
        graph cannot capture. With one token the experts hit are its top-k: this runs them in the order the eager loop
        does (ascending expert id), picking each expert's weights by a device index, and adds their weighted outputs
        into an fp32 zero buffer in that order — the same operations on the same values, so the same result bit for
        bit, with no host read. Other shapes and the batched implementations go through the module itself.
        """
        if h.shape[0] * h.shape[1] != 1 or self.hf_config._experts_implementation != "eager":
            return moe(h)
        experts = moe.experts
        _, weights, index = moe.gate(h)  # [1, k] fp32, [1, k]
        index, order = index.sort(dim=-1)  # the eager loop visits the experts hit in ascending id
        weights = weights.gather(-1, order)
        x = moe.fc1_latent_proj(h.view(1, -1))
        out = torch.zeros_like(x, dtype=weights.dtype)
        for slot in range(index.shape[-1]):
            expert = index[0, slot:slot + 1]  # device index [1]: no host read
            y = nn.functional.linear(x, experts.up_proj.index_select(0, expert)[0])
            y = nn.functional.linear(experts.act_fn(y), experts.down_proj.index_select(0, expert)[0])
            out = out + (y * weights[:, slot, None]).to(out.dtype)
        out = moe.fc2_latent_proj(out.to(x.dtype)).view(h.shape)
        return out + moe.shared_experts(h)

