"""`load_checkpoint`: open a Superlinear-Exp-style checkpoint (config.json + safetensors shards) with no remote code
and no pickle, strictly; `save_checkpoint` writes one in the same layout (used to build test checkpoints).

Assumed tensor names — the ONE table (`KEY_MAP`). The released checkpoint's names are *inferred*: the base model's
(Nemotron-H) names for everything it shares, and ``q1_proj`` for the search-query projection, whose name and form
(a separate linear of the same shape as ``q_proj``, docs/algorithm.md §5.1) are not published. Override any row with
``load_checkpoint(path, key_map={model name: checkpoint name})``. ``{i}`` is the block index, ``{j}`` the expert.

| model tensor (this toolkit)                     | checkpoint tensor                                        | block |
|-------------------------------------------------|----------------------------------------------------------|-------|
| ``embed.weight``                                | ``backbone.embeddings.weight``                           | all   |
| ``blocks.{i}.norm.weight``                      | ``backbone.layers.{i}.norm.weight``                      | all   |
| ``norm_f.weight``                               | ``backbone.norm_f.weight``                               | all   |
| ``lm_head.weight``                              | ``lm_head.weight`` (absent when tied)                    | all   |
| ``blocks.{i}.mixer.in_proj.weight`` / ``.bias`` | ``backbone.layers.{i}.mixer.in_proj.weight`` / ``.bias`` | M     |
| ``blocks.{i}.mixer.conv1d.weight`` / ``.bias``  | ``backbone.layers.{i}.mixer.conv1d.weight`` / ``.bias``  | M     |
| ``blocks.{i}.mixer.{A_log, D, dt_bias}``        | ``backbone.layers.{i}.mixer.{A_log, D, dt_bias}``        | M     |
| ``blocks.{i}.mixer.norm.weight``                | ``backbone.layers.{i}.mixer.norm.weight``                | M     |
| ``blocks.{i}.mixer.out_proj.weight`` / ``.bias``| ``backbone.layers.{i}.mixer.out_proj.weight`` / ``.bias``| M     |
| ``blocks.{i}.mixer.gate.weight``                | ``backbone.layers.{i}.mixer.gate.weight``                | E     |
| ``blocks.{i}.mixer.gate.e_score_correction_bias``| ``backbone.layers.{i}.mixer.gate.e_score_correction_bias``| E   |
| ``blocks.{i}.mixer.experts.up_proj.{j}``        | ``backbone.layers.{i}.mixer.experts.{j}.up_proj.weight`` | E     |
| ``blocks.{i}.mixer.experts.down_proj.{j}``      | ``backbone.layers.{i}.mixer.experts.{j}.down_proj.weight``| E    |
| ``blocks.{i}.mixer.shared_experts.{up,down}_proj.weight`` | ``backbone.layers.{i}.mixer.shared_experts.{up,down}_proj.weight`` | E |
| ``blocks.{i}.mixer.q1_proj.weight`` (search Q1) | ``backbone.layers.{i}.mixer.q1_proj.weight`` *(inferred)* | *    |
| ``blocks.{i}.mixer.q2_proj.weight`` (attention Q2) | ``backbone.layers.{i}.mixer.q_proj.weight``           | *     |
| ``blocks.{i}.mixer.{k,v,o}_proj.weight``        | ``backbone.layers.{i}.mixer.{k,v,o}_proj.weight``        | *     |
| ``blocks.{i}.mixer.{up,down}_proj.weight``      | ``backbone.layers.{i}.mixer.{up,down}_proj.weight``      | -     |

Model tensor ``experts.up_proj.{j}`` is row j of the stacked [E, I, H] expert parameter; checkpoints store one
tensor per expert. Biases (``mlp_bias``, ``use_bias``) map like their weights.

Refusals (each a `CheckpointError` naming the file and the key): ``model_type`` other than ``superlinear-exp``;
``auto_map`` (remote code) unless ``ignore_auto_map=True``; pickle-based files (``.bin``/``.pt``/…, or a
``.safetensors`` name holding a pickle/zip); shards missing or outside the directory; tensors the model needs
that the index lacks (missing) and tensors the index lists that the model does not have (unexpected); a shard
without a tensor its index assigns to it; shape mismatches; dtype mismatches (non-float tensors, or a float
dtype other than the checkpoint's declared ``torch_dtype`` — fp32 is also accepted for the rows in
`FP32_ALLOWED`, which checkpoints commonly keep in fp32).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from superlinear_kernels import SpanConfig

from ..model.io import sha256_file
from .config import CheckpointError, SuperlinearExpConfig
from .files import FLOAT_DTYPES, PICKLE_SUFFIXES, checkpoint_shards, shard_headers
from .model import SuperlinearExpLM
from .tokenizer import CheckpointTokenizer, IdTokenizer

_M, _L = "blocks.{i}.mixer.", "backbone.layers.{i}.mixer."
KEY_MAP: dict[str, str] = {
    "embed.weight": "backbone.embeddings.weight",
    "blocks.{i}.norm.weight": "backbone.layers.{i}.norm.weight",
    "norm_f.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
    # M: Mamba-2
    **{_M + n: _L + n for n in ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "A_log", "D",
                                "dt_bias", "norm.weight", "out_proj.weight", "out_proj.bias")},
    # E: mixture of experts
    **{_M + n: _L + n for n in ("gate.weight", "gate.e_score_correction_bias", "shared_experts.up_proj.weight",
                                "shared_experts.up_proj.bias", "shared_experts.down_proj.weight",
                                "shared_experts.down_proj.bias")},
    _M + "experts.up_proj.{j}": _L + "experts.{j}.up_proj.weight",
    _M + "experts.down_proj.{j}": _L + "experts.{j}.down_proj.weight",
    # *: Superlinear attention (Q1 = search/gate query, Q2 = attention query)
    _M + "q1_proj.weight": _L + "q1_proj.weight",
    _M + "q2_proj.weight": _L + "q_proj.weight",
    **{_M + n: _L + n for n in ("k_proj.weight", "v_proj.weight", "o_proj.weight")},
    # -: MLP
    **{_M + n: _L + n for n in ("up_proj.weight", "up_proj.bias", "down_proj.weight", "down_proj.bias")},
}
# Model tensors whose checkpoint copy may be fp32 whatever the declared dtype.
FP32_ALLOWED = frozenset(_M + n for n in ("gate.weight", "gate.e_score_correction_bias", "A_log", "D", "dt_bias"))
_STACKED = ("experts.up_proj", "experts.down_proj")  # [E, ...] parameters stored as one tensor per expert
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{[ij]\})", template)
    return re.compile("".join(f"(?P<{p[1]}>\\d+)" if p in ("{i}", "{j}") else re.escape(p) for p in parts))


def model_tensor_names(model: SuperlinearExpLM) -> dict[str, tuple]:
    """{model tensor name: (parameter/buffer name, row index or None, shape)} — stacked experts expanded per row."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(_STACKED):
            for j in range(t.shape[0]):
                out[f"{name}.{j}"] = (name, j, tuple(t.shape[1:]))
        else:
            out[name] = (name, None, tuple(t.shape))
    return out


def checkpoint_names(model: SuperlinearExpLM, key_map: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """{checkpoint tensor name: (model tensor name, KEY_MAP row)} under `KEY_MAP` updated by `key_map`.

    Raises CheckpointError if a model tensor matches no row, two model tensors map to one checkpoint name, or a
    row of `key_map` matches no model tensor (a typo would otherwise be ignored).
    """
    rows = {**KEY_MAP, **(key_map or {})}
    compiled = [(row, _template_regex(row), ckpt) for row, ckpt in rows.items()]
    out: dict[str, tuple[str, str]] = {}
    for name in model_tensor_names(model):
        for row, regex, ckpt in compiled:
            match = regex.fullmatch(name)
            if match:
                target = ckpt.format(**match.groupdict())
                if target in out:
                    raise CheckpointError(f"key_map: {out[target][0]!r} and {name!r} both map to checkpoint key "
                                          f"{target!r}")
                out[target] = (name, row)
                break
        else:
            raise CheckpointError(f"key_map: no row for model tensor {name!r}")
    unused = sorted(set(key_map or {}) - {row for _, row in out.values()})
    if unused:
        raise CheckpointError(f"key_map: row {unused[0]!r} matches no tensor of this model")
    return out


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)} (or None: the checkpoint's own dtype)")


def load_checkpoint(path, *, device: str | torch.device = "cpu", dtype=None, span: SpanConfig | None = None,
                    key_map: dict[str, str] | None = None, ignore_auto_map: bool = False,
                    backend: str = "auto", experts_implementation: str = "eager") -> SuperlinearExpLM:
    """Load a Superlinear-Exp-style checkpoint directory into a `SuperlinearExpLM` (eval mode).

    Args:
        path: directory with ``config.json``, ``model.safetensors.index.json`` + shards (or one
            ``model.safetensors``) and optionally ``tokenizer.json``.
        device: where the weights go (tensors are read shard by shard straight into the allocated model).
        dtype: "float16", "bfloat16", "float32" or a torch dtype; None keeps the checkpoint's declared dtype.
            Converting is explicit (Decision D6 in docs/design.md): the router stays fp32 (`SuperlinearExpLM.keep_router_fp32`).
        span: span geometry when config.json has no ``span_attention_*`` keys (``SpanConfig.release()`` for
            Superlinear-Exp-v0.1); overrides them when it has.
        key_map: rows that replace or extend `KEY_MAP` ({model tensor template: checkpoint tensor template}).
        ignore_auto_map: accept a config.json with ``auto_map``; the named code is never run.
        backend: attention backend ("auto", "torch", "triton", "oracle").
        experts_implementation: MoE expert kernels, "eager", "batched_mm" or "grouped_mm"
            (`SuperlinearExpLM.set_experts_implementation`).

    Returns:
        the model, with ``model.tokenizer``, ``model.model_id`` (``superlinear-exp/<dir name>``) and
        ``model.source`` (kind, name, path, sha256 of config.json and the index — ``weights_sha256`` is the
        index's — fingerprinted by snapshots) set.

    Raises:
        CheckpointError: a refusal listed in the module docstring; the message names the file and the key.
    """
    root = Path(path)
    if root.is_file():
        if root.name.lower().endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{root}: pickle-based weight file; only safetensors checkpoints are loaded")
        raise CheckpointError(f"{root}: expected a checkpoint directory (config.json + safetensors shards)")
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    want_dtype = _resolve_dtype(dtype)
    cfg = SuperlinearExpConfig.from_file(root / "config.json", span=span, ignore_auto_map=ignore_auto_map)
    index_name, weight_map = checkpoint_shards(root)
    headers = shard_headers(root, weight_map)

    with torch.device("meta"):
        model = SuperlinearExpLM(cfg, backend=backend, experts_implementation=experts_implementation)
    names = checkpoint_names(model, key_map)
    layout = model_tensor_names(model)
    missing = [k for k in names if k not in weight_map]
    if missing:
        raise CheckpointError(f"{root / index_name}: key {missing[0]!r} (model tensor {names[missing[0]][0]!r}) is "
                              f"missing; {len(missing)} missing in all")
    unexpected = [k for k in weight_map if k not in names]
    if unexpected:
        raise CheckpointError(f"{root / weight_map[unexpected[0]]}: key {unexpected[0]!r} is unexpected (no model "
                              f"tensor maps to it); {len(unexpected)} unexpected in all")

    declared = cfg.torch_dtype
    if declared is None:  # no torch_dtype in config.json: the embedding's dtype is the checkpoint's
        embed_key = next(k for k, (name, _) in names.items() if name == "embed.weight")
        declared = FLOAT_DTYPES.get(headers[weight_map[embed_key]][embed_key].dtype)
    if declared not in _DTYPES:
        raise CheckpointError(f"{root / 'config.json'}: key 'torch_dtype': checkpoint dtype {declared!r} is not "
                              f"one of {sorted(_DTYPES)}")
    for key, (model_name, row) in names.items():
        shard = weight_map[key]
        info = headers[shard].get(key)
        where = f"{root / shard}: key {key!r}"
        if info is None:
            raise CheckpointError(f"{where}: listed in {index_name} but not stored in the shard")
        _, _, shape = layout[model_name]
        if tuple(info.shape) != shape:
            raise CheckpointError(f"{where}: shape {list(info.shape)}, the model needs {list(shape)} "
                                  f"(model tensor {model_name!r})")
        stored = FLOAT_DTYPES.get(info.dtype)
        if stored is None or (stored != declared and not (row in FP32_ALLOWED and stored == "float32")):
            raise CheckpointError(f"{where}: dtype {info.dtype}, expected {declared} (the checkpoint's dtype)"
                                  + (" or float32" if row in FP32_ALLOWED else ""))

    model.to(dtype=want_dtype or _DTYPES[declared])
    model.keep_router_fp32()
    model.to_empty(device=device)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    written = set()
    with torch.no_grad():
        for shard in sorted(headers):
            keys = [k for k in names if weight_map[k] == shard]
            with safe_open(str(root / shard), framework="pt", device="cpu") as f:
                for key in keys:
                    param_name, index, _ = layout[names[key][0]]
                    target = params[param_name] if index is None else params[param_name][index]
                    target.copy_(f.get_tensor(key))
                    written.add(names[key][0])
    assert written == set(layout), "every model tensor is written exactly once"  # guaranteed by the checks above

    tok_path = root / "tokenizer.json"
    model.tokenizer = CheckpointTokenizer(tok_path, cfg.eos_token_id) if tok_path.is_file() \
        else IdTokenizer(cfg.vocab_size, cfg.eos_token_id)
    model.model_id = f"superlinear-exp/{root.name}"
    files = {n: sha256_file(root / n) for n in ("config.json", index_name)}
    model.source = {"kind": "checkpoint", "path": str(root), "name": root.name,
                    "weights_sha256": files[index_name], "files": files}
    return model.eval()


def save_checkpoint(model: SuperlinearExpLM, path, *, max_shard_bytes: int = 1 << 30,
                    key_map: dict[str, str] | None = None, tokenizer_json: str | None = None) -> Path:
    """Write `model` as a Superlinear-Exp-style checkpoint: ``config.json``, shards ``model-0000k-of-0000n
    .safetensors`` of at most `max_shard_bytes` each (a tensor is never split), ``model.safetensors.index.json``
    and optionally ``tokenizer.json`` (its JSON text). Names follow `KEY_MAP` (updated by `key_map`)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    layout = model_tensor_names(model)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, (model_name, _) in checkpoint_names(model, key_map).items():
        param_name, index, _ = layout[model_name]
        t = params[param_name] if index is None else params[param_name][index]
        t = t.detach().to("cpu").contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    cfg = model.cfg.to_hf_dict()
    cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_text(tokenizer_json)
    return out
