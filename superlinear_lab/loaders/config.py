"""`SuperlinearExpConfig`: the architecture of a Superlinear-Exp-style checkpoint, read from its ``config.json``.

The released model (Superlinear-Exp-v0.1, docs/algorithm.md §5) is NVIDIA Nemotron-3-Nano with its six attention layers
replaced by Superlinear attention. Its ``config.json`` is Hugging Face style; this module reads it leniently
(NaN/Infinity literals are accepted, the model page flags that file as invalid JSON) but strictly in substance:

* ``model_type`` must be ``superlinear-exp``;
* an ``auto_map`` entry (code the publisher wants executed) is refused unless the caller acknowledges that it
  is ignored (``ignore_auto_map=True``): this toolkit never runs checkpoint code;
* every field that fixes a tensor shape must be present (`SHAPE_FIELDS`); behavioural fields that are absent
  take the transformers NemotronH defaults and are listed in ``cfg.defaults_used``;
* an unknown ``span_attention_*`` key is refused (it would change the attention math); other unknown keys are
  ignored with a warning and listed in ``cfg.ignored_keys``;
* the layer pattern (``hybrid_override_pattern``) uses ``M`` Mamba-2, ``E`` mixture-of-experts, ``*`` attention,
  ``-`` MLP; the ``span_attention_*`` fields become a `SpanConfig`.

The dataclass defaults are the released layout (docs/algorithm.md §5.2, *inferred* from the base model) and the release span
preset (docs/algorithm.md §5.3), so ``SuperlinearExpConfig.released()`` describes Superlinear-Exp-v0.1 without any file.
The config also answers the attribute names of `superlinear_lab.model.ModelConfig` that `HybridCache`,
`Session` and `SnapshotStore` read (``attention_layers``, ``n_kv_heads``, ``conv_dim``, …).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from superlinear_kernels import SpanConfig

MODEL_TYPE = "superlinear-exp"
LAYER_KINDS = {"M": "mamba2", "E": "moe", "*": "superlinear_attention", "-": "mlp"}
RELEASED_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"  # docs/algorithm.md §5.2 (inferred)

# config.json key -> SpanConfig field (docs/algorithm.md §5.3). `inv_search_power_int` is the integer-mode alternative.
SPAN_KEYS = {
    "span_attention_sw_index": "sw_index",
    "span_attention_num_spans": "num_spans",
    "span_attention_backward_factor": "backward_factor",
    "span_attention_forward_factor": "forward_factor",
    "span_attention_span_power": "span_power",
    "span_attention_search_power": "search_power",
    "span_attention_inv_search_power_int": "inv_search_power_int",
}

# Fields without which the tensor shapes are unknown: absent from config.json -> refused, never guessed.
SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "mamba_num_heads",
    "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "n_routed_experts",
    "moe_intermediate_size", "moe_shared_expert_intermediate_size",
)
# Old Nemotron-H names that transformers also accepts.
_ALIASES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_chunk_size": "chunk_size",
            "mamba_conv_bias": "use_conv_bias", "mamba_dt_limit": "time_step_limit"}
# config.json keys that are read but have no field here (documentation, loader hints of the original code).
_IGNORED_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "num_hidden_layers", "layers_block_type",
    "use_cache", "num_logits_to_keep", "initializer_range", "rescale_prenorm_residual", "residual_in_fp32",
    "hidden_dropout", "attention_dropout", "use_mamba_kernels", "mamba_proj_bias", "mamba_ssm_cache_dtype",
    "time_step_min", "time_step_max", "time_step_floor", "expand", "output_router_logits", "n_shared_experts",
    "moe_shared_expert_overlap", "moe_latent_size", "num_nextn_predict_layers", "mtp_layers_block_type",
    "sliding_window", "max_position_embeddings", "span_attention_implementation", "span_attention_decode_kernel",
    "attn_implementation", "decode_kernel", "_name_or_path", "model_type", "auto_map", "hybrid_override_pattern",
    "enable_cuda_graph", "use_shared_fused_moe", "rope_theta", "rope_scaling", "partial_rotary_factor",
}


# Dataclass fields that are not config.json keys of the same name.
_NOT_HF_FIELDS = {"pattern", "span", "defaults_used", "ignored_keys", "torch_dtype", "eos_token_id"}


class CheckpointError(ValueError):
    """A checkpoint that this loader refuses; the message names the file and, where there is one, the key."""


def read_json_lenient(path) -> dict:
    """Parse a JSON file that may contain the non-standard literals NaN, Infinity and -Infinity.

    Raises CheckpointError naming the file if it is not a JSON object.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    constants = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    try:
        data = json.loads(text, parse_constant=constants.__getitem__)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON even with NaN/Infinity allowed ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a usable JSON object (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class SuperlinearExpConfig:
    """Architecture of a Superlinear-Exp-style hybrid model; defaults = Superlinear-Exp-v0.1 (docs/algorithm.md §5.2–5.3).

    Example::

        cfg = SuperlinearExpConfig.released()
        cfg.attention_layers     # [5, 12, 19, 26, 33, 42]
        cfg.kv_bytes_per_token(2)  # 6144
    """

    vocab_size: int = 131072  # tokens
    hidden_size: int = 2688  # residual width
    pattern: str = RELEASED_PATTERN  # one char per block: M Mamba-2, E MoE, * Superlinear attention, - MLP
    num_attention_heads: int = 32  # H_Q of the attention layers (Q1 and Q2)
    num_key_value_heads: int = 2  # H_KV (GQA 16:1)
    head_dim: int = 128  # D of Q1, Q2, K, V
    mamba_num_heads: int = 64  # SSM heads H
    mamba_head_dim: int = 64  # channels per SSM head P
    ssm_state_size: int = 128  # SSM state N per group
    n_groups: int = 8  # B/C groups of the SSM
    conv_kernel: int = 4  # causal depthwise convolution width
    chunk_size: int = 128  # chunk length of the chunked SSM scan (rounding only)
    use_conv_bias: bool = True  # the convolution has a bias
    use_bias: bool = False  # bias on the Mamba in/out projections
    mamba_hidden_act: str = "silu"  # activation after the convolution
    time_step_limit: tuple = (0.0, math.inf)  # clamp of the SSM step dt
    n_routed_experts: int = 128  # routed experts per MoE layer
    num_experts_per_tok: int = 6  # top-k routed experts
    moe_intermediate_size: int = 1856  # hidden width of one routed expert
    moe_shared_expert_intermediate_size: int = 3712  # hidden width of the shared expert
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups kept per token
    norm_topk_prob: bool = True  # renormalise the top-k router weights
    routed_scaling_factor: float = 1.0  # multiplier of the routed experts' output
    intermediate_size: int = 21504  # hidden width of a dense `-` MLP block
    mlp_hidden_act: str = "relu2"  # activation of experts and MLPs
    mlp_bias: bool = False  # bias on MLP / expert projections
    attention_bias: bool = False  # bias on Q/K/V/O (unsupported: must be False)
    layer_norm_epsilon: float = 1e-5  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # the output head reuses the embedding matrix
    max_position_embeddings: int = 262144  # trained context (informational; no RoPE)
    eos_token_id: int | None = None  # end-of-sequence token (the first one when config.json lists several)
    torch_dtype: str | None = None  # storage dtype declared by config.json ("bfloat16", "float16", ...)
    span: SpanConfig = field(default_factory=SpanConfig.release)  # geometry of every attention layer
    defaults_used: tuple = ()  # behavioural config.json keys that were absent (NemotronH defaults taken)
    ignored_keys: tuple = ()  # config.json keys this loader does not understand (ignored, with a warning)

    def __post_init__(self) -> None:
        def fail(name, value, expected):
            raise ValueError(f"SuperlinearExpConfig.{name}={value!r}: expected {expected}")

        if not isinstance(self.pattern, str) or not self.pattern or set(self.pattern) - set(LAYER_KINDS):
            fail("pattern", self.pattern, f"a non-empty string over {sorted(LAYER_KINDS)} (M, E, *, -)")
        for name in SHAPE_FIELDS + ("chunk_size", "num_experts_per_tok", "n_group", "topk_group",
                                    "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, value, "an int >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_attention_heads", self.num_attention_heads,
                 f"a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.mamba_num_heads % self.n_groups:
            fail("mamba_num_heads", self.mamba_num_heads, f"a multiple of n_groups={self.n_groups}")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", self.num_experts_per_tok, f"<= n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_group or self.n_routed_experts // self.n_group < 2:
            fail("n_group", self.n_group, f"a divisor of n_routed_experts={self.n_routed_experts} leaving >= 2 "
                                          "experts per group (the router scores each group by its top 2)")
        if self.topk_group > self.n_group:
            fail("topk_group", self.topk_group, f"<= n_group={self.n_group}")
        if self.conv_kernel < 2:
            fail("conv_kernel", self.conv_kernel, "an int >= 2")
        if self.attention_bias:
            fail("attention_bias", self.attention_bias, "False (the attention layer has no biases)")
        # config.json may spell NaN/Infinity (read_json_lenient accepts the literals, the released dt limit is
        # [0, Infinity]); a NaN or infinite epsilon or scale would load and give NaN logits.
        for name in ("routed_scaling_factor", "layer_norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, value, "a finite number")
        if self.layer_norm_epsilon <= 0:
            fail("layer_norm_epsilon", self.layer_norm_epsilon, "a number > 0")
        limit = self.time_step_limit
        if not isinstance(limit, (tuple, list)) or len(limit) != 2 or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) for x in limit) \
                or not (0 <= limit[0] < limit[1]) or math.isinf(limit[0]):
            fail("time_step_limit", limit, "[low, high] with 0 <= low < high, low finite (high may be Infinity)")
        if not isinstance(self.span, SpanConfig):
            fail("span", self.span, "a SpanConfig")
        object.__setattr__(self, "time_step_limit", tuple(float(x) for x in self.time_step_limit))

    # ------------------------------------------------------------------ presets
    @classmethod
    def released(cls, **changes) -> "SuperlinearExpConfig":
        """Superlinear-Exp-v0.1 as docs/algorithm.md §5.2–5.3 describe it (layout inferred from the base model)."""
        return cls(**changes)

    @classmethod
    def tiny(cls, **changes) -> "SuperlinearExpConfig":
        """A CPU-sized model in the released style: 13 blocks ``MEM*EMEM*EM-E`` (5 Mamba-2, 5 MoE, 2 attention,
        1 MLP), width 64, 8 experts, the teaching span preset (W = 15, so routing is active on short inputs)."""
        base = dict(vocab_size=320, hidden_size=64, pattern="MEM*EMEM*EM-E", num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
                    n_groups=2, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                    intermediate_size=96, max_position_embeddings=4096, eos_token_id=256,
                    span=SpanConfig.default())
        return cls(**(base | changes))

    def replace(self, **changes) -> "SuperlinearExpConfig":
        return replace(self, **changes)

    # ------------------------------------------------------------------ layout
    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    def layers_of(self, kind: str) -> list[int]:
        """Block indices whose pattern character is `kind` ("M", "E", "*" or "-")."""
        return [i for i, c in enumerate(self.pattern) if c == kind]

    @property
    def attention_layers(self) -> list[int]:
        return self.layers_of("*")

    @property
    def mamba_layers(self) -> list[int]:
        return self.layers_of("M")

    # ModelConfig-compatible names (read by HybridCache, Session, SnapshotStore).
    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def ssm_heads(self) -> int:
        return self.mamba_num_heads

    @property
    def ssm_head_dim(self) -> int:
        return self.mamba_head_dim

    @property
    def ssm_state(self) -> int:
        return self.ssm_state_size

    @property
    def d_inner(self) -> int:
        """SSM inner width H * P."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the convolution: x (H * P) + B and C (n_groups * N each)."""
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    # ------------------------------------------------------------------ memory arithmetic
    def kv_bytes_per_token(self, itemsize: int) -> int:
        """K and V of every attention layer for one token: n_attn * 2 * H_KV * D * itemsize."""
        return len(self.attention_layers) * 2 * self.num_key_value_heads * self.head_dim * itemsize

    def state_elements(self) -> dict[str, int]:
        """Recurrent state per batch row: ssm (n_mamba * H * P * N, kept in fp32) and conv
        (n_mamba * conv_dim * (conv_kernel - 1), model dtype) — the shapes `HybridCache` allocates."""
        n = len(self.mamba_layers)
        return {"ssm": n * self.mamba_num_heads * self.mamba_head_dim * self.ssm_state_size,
                "conv": n * self.conv_dim * (self.conv_kernel - 1)}

    def parameter_counts(self) -> dict[str, int]:
        """Checkpoint tensor elements by part, counted from the layout this loader builds (`SuperlinearExpLM`):
        its parameters plus the MoE router's score-correction bias (a buffer there, a tensor in the checkpoint).

        Keys: embedding, lm_head, norms, mamba, moe_routed, moe_shared, moe_router, attention, mlp, total.
        The attention count includes the search-query projection Q1 (same shape as Q2, docs/algorithm.md §5.1).
        """
        h = self.hidden_size
        pattern = self.pattern
        bias_m, bias_mlp = int(self.use_bias), int(self.mlp_bias)
        d_in, conv = self.d_inner, self.conv_dim
        mamba = (h * (d_in + conv + self.mamba_num_heads) + bias_m * (d_in + conv + self.mamba_num_heads)
                 + conv * self.conv_kernel + int(self.use_conv_bias) * conv
                 + 3 * self.mamba_num_heads + d_in + d_in * h + bias_m * h)
        e, i_e, i_s = self.n_routed_experts, self.moe_intermediate_size, self.moe_shared_expert_intermediate_size
        hq, hkv, d = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        counts = {
            "embedding": self.vocab_size * h,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * h,
            "norms": (len(pattern) + 1) * h,
            "mamba": pattern.count("M") * mamba,
            "moe_routed": pattern.count("E") * e * 2 * i_e * h,
            "moe_shared": pattern.count("E") * (2 * i_s * h + bias_mlp * (i_s + h)),
            "moe_router": pattern.count("E") * (e * h + e),
            "attention": pattern.count("*") * (2 * hq * d * h + 2 * hkv * d * h + hq * d * h),
            "mlp": pattern.count("-") * (2 * self.intermediate_size * h + bias_mlp * (self.intermediate_size + h)),
        }
        counts["total"] = sum(counts.values())
        return counts

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """JSON-serialisable fields (this toolkit's own form; fingerprinted by snapshots)."""
        d = asdict(self)
        d["span"] = self.span.to_dict()
        d["time_step_limit"] = list(self.time_step_limit)
        d["defaults_used"] = list(self.defaults_used)
        d["ignored_keys"] = list(self.ignored_keys)
        d["model_type"] = MODEL_TYPE
        return d

    def to_hf_dict(self) -> dict:
        """The Hugging Face style ``config.json`` a Superlinear-Exp checkpoint carries (inverse of `from_hf_dict`)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in _NOT_HF_FIELDS}
        d["time_step_limit"] = list(self.time_step_limit)
        d["model_type"] = MODEL_TYPE
        d["hybrid_override_pattern"] = self.pattern
        d["num_hidden_layers"] = self.n_layers
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        span = self.span.to_dict()
        for key, name in SPAN_KEYS.items():
            if name in span:
                d[key] = span[name]
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, *, source: str = "config.json", span: SpanConfig | None = None,
                     ignore_auto_map: bool = False) -> "SuperlinearExpConfig":
        """Validate and convert a Hugging Face style config dict (see the module docstring for the rules).

        Args:
            d: the parsed ``config.json``.
            source: the file name used in error messages.
            span: span geometry to use when config.json has no ``span_attention_*`` keys (the released model
                passes them at load time, docs/algorithm.md §5.3: use ``SpanConfig.release()``); when both exist, `span` wins.
            ignore_auto_map: accept a config that names remote code in ``auto_map``; that code is never run.
        """
        def refuse(key, message):
            raise CheckpointError(f"{source}: key {key!r}: {message}")

        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            refuse("model_type", f"is {model_type!r}; this loader reads only {MODEL_TYPE!r} checkpoints")
        if "auto_map" in d and not ignore_auto_map:
            refuse("auto_map", f"names remote code ({d['auto_map']!r}); this toolkit never runs checkpoint code. "
                               "Pass ignore_auto_map=True to load with the built-in implementation instead")
        d = {_ALIASES.get(k, k): v for k, v in d.items()}
        pattern = d.get("hybrid_override_pattern")
        if pattern is None and isinstance(d.get("layers_block_type"), list):
            names = {"mamba": "M", "linear_attention": "M", "moe": "E", "attention": "*", "full_attention": "*",
                     "mlp": "-"}
            unknown = [t for t in d["layers_block_type"] if t not in names]
            if unknown:
                refuse("layers_block_type", f"unknown layer types {unknown}")
            pattern = "".join(names[t] for t in d["layers_block_type"])
        if not isinstance(pattern, str) or not pattern or set(pattern) - set(LAYER_KINDS):
            refuse("hybrid_override_pattern", f"is {pattern!r}; expected a string over M, E, *, -")
        if "num_hidden_layers" in d and d["num_hidden_layers"] != len(pattern):
            refuse("num_hidden_layers", f"is {d['num_hidden_layers']} but the pattern has {len(pattern)} layers")
        for key in SHAPE_FIELDS:
            if key not in d:
                refuse(key, "is missing; it fixes tensor shapes and is never guessed")
        known = {f.name for f in fields(cls)} - _NOT_HF_FIELDS
        unknown = sorted(set(d) - known - _IGNORED_KEYS - set(SPAN_KEYS) - {"eos_token_id", "bos_token_id",
                                                                           "pad_token_id"})
        for key in unknown:
            if key.startswith("span_attention_"):
                refuse(key, f"is not understood by this loader; known span keys: {sorted(SPAN_KEYS)}")
        if unknown:
            warnings.warn(f"{source}: keys not understood by this loader were ignored: {unknown}", stacklevel=3)
        kwargs = {k: d[k] for k in known if k in d}
        span_fields = {name: d[key] for key, name in SPAN_KEYS.items() if key in d}
        if span is None:
            if not span_fields:
                refuse("span_attention_search_power", "no span_attention_* keys; pass span=SpanConfig.release() "
                                                      "for Superlinear-Exp-v0.1 (docs/algorithm.md §5.3) or the preset you trained")
            try:
                span = SpanConfig.from_kernel_args(**span_fields)
            except (TypeError, ValueError) as e:
                refuse(next(iter(k for k in SPAN_KEYS if k in d)), f"invalid span parameters: {e}")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        dtype = d.get("torch_dtype", d.get("dtype"))
        defaults_used = tuple(sorted(known - set(SHAPE_FIELDS) - set(kwargs)))
        try:
            return cls(pattern=pattern, span=span, eos_token_id=eos, torch_dtype=dtype,
                       defaults_used=defaults_used, ignored_keys=tuple(unknown), **kwargs)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path, *, span: SpanConfig | None = None,
                  ignore_auto_map: bool = False) -> "SuperlinearExpConfig":
        """Read ``config.json`` (a file, or a checkpoint directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        return cls.from_hf_dict(read_json_lenient(path), source=str(path), span=span,
                                ignore_auto_map=ignore_auto_map)

    def to_nemotron_config(self, experts_implementation: str = "eager"):
        """The transformers `NemotronHConfig` that the Mamba-2 / MoE / MLP modules are built from.

        `experts_implementation`: "eager" (a loop over the experts hit), "batched_mm" or "grouped_mm"
        (transformers' batched expert kernels; same results up to rounding).
        """
        from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

        hf = NemotronHConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, hybrid_override_pattern=self.pattern,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, mamba_num_heads=self.mamba_num_heads, mamba_head_dim=self.mamba_head_dim,
            ssm_state_size=self.ssm_state_size, n_groups=self.n_groups, conv_kernel=self.conv_kernel,
            chunk_size=self.chunk_size, use_conv_bias=self.use_conv_bias, use_bias=self.use_bias,
            mamba_hidden_act=self.mamba_hidden_act, time_step_limit=self.time_step_limit,
            n_routed_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
            n_group=self.n_group, topk_group=self.topk_group, norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor, intermediate_size=self.intermediate_size,
            mlp_hidden_act=self.mlp_hidden_act, mlp_bias=self.mlp_bias, layer_norm_epsilon=self.layer_norm_epsilon,
            tie_word_embeddings=self.tie_word_embeddings, max_position_embeddings=self.max_position_embeddings,
        )
        hf._experts_implementation = experts_implementation  # read by every MoE block at each call
        return hf
