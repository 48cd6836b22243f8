"""`plan_memory`: will a Superlinear-Exp-style model and its sessions fit on a GPU, and how long can a session be?

GPU bytes = weights + reserve + prefill workspace + sessions x (recurrent state + context x KV bytes per token).

* **weights** — from the shard headers when a checkpoint directory is given (8-byte length + JSON per shard, no
  tensor is read), counted at the planned dtype (fp32 router rows stay fp32); otherwise from the parameter
  count of the layout this loader builds (`SuperlinearExpConfig.parameter_counts`).
* **KV bytes per token** — n_attention_layers x 2 (K, V) x H_KV x D x itemsize. Q1 adds no cache.
* **recurrent state per session** — SSM states n_mamba x H x P x N in fp32 plus conv states
  n_mamba x conv_dim x (conv_kernel - 1) in the model dtype: what `HybridCache` allocates.
* **workspace** — the fp32 logits of one prefill chunk, chunk_size x vocab x 4 bytes (`Session.append` computes
  logits for every token of a chunk); **reserve** — CUDA context, allocator slack and the other activations of a
  chunk: a flat estimate (default 1 GiB), measure and pass your own.

For the released configuration (docs/algorithm.md §5.2–5.4): 6,144 B/token at 16-bit (exactly 6 GiB per 2^20 tokens) and
31.6 B parameters, 63.3 GB (58.9 GiB) at 16-bit. *Inferred* parts: the layout itself (docs/algorithm.md §5.2 is derived from
the base model's configuration), Q1 being a separate projection of Q2's shape, and untied embeddings; the
KV arithmetic depends only on the six attention layers x 2 KV heads x 128, which the model card's memory
figures confirm.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import CheckpointError, SuperlinearExpConfig
from .files import FLOAT_DTYPES, TensorInfo, checkpoint_shards, shard_headers

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
_ROUTER_ROWS = re.compile(r"\.mixer\.gate\.(weight|e_score_correction_bias)$")


def parse_bytes(text) -> int:
    """'80GB' -> 80_000_000_000 (SI: kB, MB, GB, TB), '80GiB' -> 85_899_345_920 (binary: KiB … TiB; also
    K, M, G); plain numbers are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r}: expected a size such as 80GB, 141GB, 80GiB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_tokens(text) -> int:
    """'1M' -> 1,048,576; '128K' -> 131,072 (binary multiples, as context lengths are quoted); plain ints."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", str(text))
    if not match:
        raise ValueError(f"{text!r}: expected a token count such as 131072, 128K or 1M")
    return int(float(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[match.group(2).lower()])


def format_bytes(n: int) -> str:
    """'63.3 GB (58.9 GiB)', '48.2 MB (46.0 MiB)' or '6,144 B'."""
    if abs(n) < 10**6:
        return f"{n:,} B"
    if abs(n) < 10**9:
        return f"{n / 1e6:.1f} MB ({n / 2**20:.1f} MiB)"
    return f"{n / 1e9:.1f} GB ({n / 2**30:.1f} GiB)"


@dataclass(frozen=True)
class MemoryPlan:
    """The result of `plan_memory`; every size in bytes. ``str(plan)`` is a readable table."""

    dtype: str  # planned model dtype
    n_parameters: int  # parameters (from headers or the built layout)
    weight_bytes: int  # weights at `dtype`
    weight_source: str  # "shard headers (<dir>)" or "parameter count of the built layout"
    kv_bytes_per_token: int  # K + V of all attention layers for one token
    state_bytes_per_session: int  # conv + SSM states of one session
    ssm_elements: int  # SSM state elements per session (fp32)
    conv_elements: int  # conv state elements per session (model dtype)
    workspace_bytes: int  # fp32 logits of one prefill chunk
    reserve_bytes: int  # flat allowance: CUDA context, allocator slack, activations
    gpu_bytes: int  # the card
    sessions: int  # sessions sharing the card
    max_context_per_session: int  # longest context (tokens) each session can allocate; 0 if none fits

    @property
    def fits(self) -> bool:
        """Weights, reserve and the sessions' states fit with room for at least one token each."""
        return self.max_context_per_session > 0

    def kv_bytes(self, tokens: int) -> int:
        """KV cache of one session holding `tokens` tokens."""
        return tokens * self.kv_bytes_per_token

    def total_bytes(self, tokens: int) -> int:
        """GPU bytes when every session holds `tokens` tokens."""
        return (self.weight_bytes + self.workspace_bytes + self.reserve_bytes
                + self.sessions * (self.state_bytes_per_session + self.kv_bytes(tokens)))

    def to_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits}

    def __str__(self) -> str:
        rows = [
            ("dtype", self.dtype),
            ("parameters", f"{self.n_parameters:,} ({self.n_parameters / 1e9:.2f} B; {self.weight_source})"),
            ("weights", format_bytes(self.weight_bytes)),
            ("KV per token", f"{self.kv_bytes_per_token:,} B  ({format_bytes(self.kv_bytes(2**20))} per 2^20 tokens)"),
            ("state per session", f"{format_bytes(self.state_bytes_per_session)}  (ssm {self.ssm_elements:,} fp32 + "
                                  f"conv {self.conv_elements:,} elements)"),
            ("prefill workspace", format_bytes(self.workspace_bytes)),
            ("reserve", format_bytes(self.reserve_bytes)),
            ("GPU", format_bytes(self.gpu_bytes)),
            ("sessions", str(self.sessions)),
            ("longest context per session",
             f"{self.max_context_per_session:,} tokens ({self.max_context_per_session / 2**20:.2f} x 2^20)"
             if self.fits else "does not fit"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _header_tensors(root: Path) -> dict[str, TensorInfo]:
    """{tensor name: TensorInfo} of every tensor the index assigns to a shard, from the headers only."""
    _, weight_map = checkpoint_shards(root)
    out = {}
    for shard, header in shard_headers(root, weight_map).items():
        out.update({key: info for key, info in header.items() if weight_map.get(key) == shard})
    return out


def _weight_bytes(tensors: dict, dtype: str) -> int:
    """Bytes once loaded at `dtype`: float tensors converted, router rows kept fp32, others as stored."""
    total = 0
    for key, info in tensors.items():
        if _ROUTER_ROWS.search(key):
            total += info.numel * 4
        elif info.dtype in FLOAT_DTYPES:
            total += info.numel * _ITEMSIZE[dtype]
        else:
            total += info.nbytes
    return total


def plan_memory(config_or_path, gpu_bytes, sessions: int = 1, dtype: str | None = None, *,
                chunk_size: int = 4096, reserve_bytes=2**30, ignore_auto_map: bool = True) -> MemoryPlan:
    """Plan GPU memory for a Superlinear-Exp-style model (see the module docstring for the terms).

    Args:
        config_or_path: a `SuperlinearExpConfig`, a checkpoint directory (weights from its shard headers), or a
            ``config.json`` path (weights from the parameter count).
        gpu_bytes: card memory, bytes or a size string ("80GB", "141GB", "80GiB").
        sessions: sessions sharing the card; the free memory is split evenly.
        dtype: "float16", "bfloat16" or "float32"; None: the checkpoint's declared dtype (float16 for a config
            without one — the released model card's dtype).
        chunk_size: prefill chunk length (sets the logits workspace).
        reserve_bytes: flat allowance for the CUDA context, allocator slack and activations.
        ignore_auto_map: planning reads no code, so an ``auto_map`` entry is harmless here.

    Returns:
        a `MemoryPlan`; ``plan.max_context_per_session`` is the longest context each session can allocate.

    Example::

        plan = plan_memory(SuperlinearExpConfig.released(), "80GB")
        plan.kv_bytes_per_token        # 6144 at float16
    """
    if isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 1:
        raise ValueError(f"sessions={sessions!r}: expected an int >= 1")
    if dtype is not None and dtype not in _ITEMSIZE:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_ITEMSIZE)} or None")
    gpu = parse_bytes(gpu_bytes)
    reserve = parse_bytes(reserve_bytes)
    root = None
    if isinstance(config_or_path, SuperlinearExpConfig):
        cfg = config_or_path
    else:
        path = Path(config_or_path)
        root = path if path.is_dir() else None
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        # Span keys do not change memory: a config without them is planned with the release preset.
        from superlinear_kernels import SpanConfig

        try:
            cfg = SuperlinearExpConfig.from_file(path, ignore_auto_map=ignore_auto_map)
        except CheckpointError as e:
            if "span_attention" not in str(e):
                raise
            cfg = SuperlinearExpConfig.from_file(path, span=SpanConfig.release(), ignore_auto_map=ignore_auto_map)
    has_shards = root is not None and any((root / n).is_file() for n in
                                         ("model.safetensors.index.json", "model.safetensors"))
    if has_shards:
        tensors = _header_tensors(root)
        embed = next((i for k, i in tensors.items() if k.endswith("embeddings.weight")), None)
        stored = cfg.torch_dtype or (FLOAT_DTYPES.get(embed.dtype) if embed else None)
        plan_dtype = dtype or (stored if stored in _ITEMSIZE else "float16")
        n_params = sum(i.numel for i in tensors.values())
        weight_bytes = _weight_bytes(tensors, plan_dtype)
        source = f"shard headers ({root.name})"
    else:
        plan_dtype = dtype or (cfg.torch_dtype if cfg.torch_dtype in _ITEMSIZE else "float16")
        counts = cfg.parameter_counts()
        n_params = counts["total"]
        router = counts["moe_router"]
        weight_bytes = (n_params - router) * _ITEMSIZE[plan_dtype] + router * 4
        source = "parameter count of the built layout"
    itemsize = _ITEMSIZE[plan_dtype]
    elems = cfg.state_elements()
    state = elems["ssm"] * 4 + elems["conv"] * itemsize
    kv = cfg.kv_bytes_per_token(itemsize)
    workspace = chunk_size * cfg.vocab_size * 4
    free = gpu - weight_bytes - workspace - reserve - sessions * state
    context = max(0, free // (sessions * kv)) if kv else 0
    return MemoryPlan(plan_dtype, n_params, weight_bytes, source, kv, state, elems["ssm"], elems["conv"],
                      workspace, reserve, gpu, sessions, int(context))
