"""`ModelConfig`: the JSON-serialisable description of a hybrid model (layer pattern, widths, heads, SSM sizes,
the `SpanConfig` of its attention layers). One comment per field."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from superlinear_kernels import SpanConfig

MODEL_TYPE = "superlinear-lab-hybrid"
MIXERS = {"M": "mamba2", "*": "superlinear_attention"}


@dataclass(frozen=True)
class ModelConfig:
    """A small hybrid causal LM: embedding, `pattern` blocks (mixer + MLP, pre-norm residual), final norm, head.

    Example::

        cfg = ModelConfig(pattern="M*M*", d_model=128)
        cfg.attention_layers   # [1, 3]
    """

    vocab_size: int = 264  # 256 bytes + 8 special tokens (ByteTokenizer)
    pattern: str = "M*M*M*"  # one char per block: "M" Mamba-2 selective SSM, "*" superlinear attention
    d_model: int = 128  # residual width
    d_ff: int = 384  # hidden width of the SwiGLU MLP after every mixer
    n_heads: int = 4  # query heads H_Q of the attention layers
    n_kv_heads: int = 2  # key/value heads H_KV (GQA; n_heads must be a multiple)
    head_dim: int = 32  # D, shared by Q1, Q2, K, V
    span: SpanConfig = field(default_factory=SpanConfig.default)  # geometry of every attention layer
    ssm_state: int = 16  # N, state size per SSM head (one group shares B and C)
    ssm_head_dim: int = 32  # P, channels per SSM head
    ssm_expand: int = 2  # SSM inner width = ssm_expand * d_model
    conv_kernel: int = 4  # short causal depthwise convolution before the scan
    ssm_chunk: int = 64  # chunk length of the chunked (SSD) scan; only changes rounding
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # the output head reuses the embedding matrix
    init_seed: int = 0  # seed of the random initialisation (weights are a function of the config)
    init_std: float = 0.02  # std of linear/embedding initialisation

    def __post_init__(self) -> None:
        def fail(name, value, expected):
            raise ValueError(f"ModelConfig.{name}={value!r}: expected {expected}")

        if not self.pattern or set(self.pattern) - set(MIXERS):
            fail("pattern", self.pattern, f"a non-empty string over {sorted(MIXERS)}")
        for name in ("vocab_size", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim", "ssm_state",
                     "ssm_head_dim", "ssm_expand", "conv_kernel", "ssm_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, value, "an int >= 1")
        if self.n_heads % self.n_kv_heads:
            fail("n_heads", self.n_heads, f"a multiple of n_kv_heads={self.n_kv_heads}")
        if self.d_inner % self.ssm_head_dim:
            fail("ssm_head_dim", self.ssm_head_dim, f"a divisor of ssm_expand * d_model = {self.d_inner}")
        if not isinstance(self.span, SpanConfig):
            fail("span", self.span, "a SpanConfig")

    # ------------------------------------------------------------------ derived
    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    @property
    def attention_layers(self) -> list[int]:
        """Block indices whose mixer is superlinear attention."""
        return [i for i, c in enumerate(self.pattern) if c == "*"]

    @property
    def mamba_layers(self) -> list[int]:
        """Block indices whose mixer is the Mamba-2 SSM."""
        return [i for i, c in enumerate(self.pattern) if c == "M"]

    @property
    def d_inner(self) -> int:
        return self.ssm_expand * self.d_model

    @property
    def ssm_heads(self) -> int:
        return self.d_inner // self.ssm_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the short convolution: x (d_inner) + B (N) + C (N)."""
        return self.d_inner + 2 * self.ssm_state

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        d["span"] = self.span.to_dict()
        d["model_type"] = MODEL_TYPE
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        model_type = d.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type={model_type!r}: expected {MODEL_TYPE!r}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown fields {sorted(unknown)}")
        if "span" in d:
            d["span"] = SpanConfig.from_dict(d["span"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("model config: not a usable JSON object (nested too deeply)") from None
        return cls.from_dict(data)

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """The default model: 6 blocks "M*M*M*", width 128, ~1.5M parameters; fast on CPU."""
        return cls()
