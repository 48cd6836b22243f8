"""Model weights on disk (``config.json`` + ``model.safetensors``, never pickle), `load_model` and the model
fingerprint that snapshots check (SPEC §6.4).

`load_model(name)` prefers a trained model shipped under ``data/models/<name>/`` (or
``$SUPERLINEAR_LAB_MODELS/<name>/``, or an explicit ``path``); without one it returns the random
initialisation of the preset, which is a pure function of the config (seeded).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .hybrid import HybridLM

FINGERPRINT_SCHEMA = "superlinear-lab.model-fingerprint.v1"
PRESETS = {"tiny": ModelConfig.tiny}
_REPO_ROOT = Path(__file__).resolve().parents[2]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj) -> str:
    """Sorted keys, no whitespace: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def model_search_paths(name: str) -> list[Path]:
    """Directories `load_model(name)` looks in, in order: $SUPERLINEAR_LAB_MODELS/<name>, <repo>/data/models/<name>."""
    paths = []
    if os.environ.get("SUPERLINEAR_LAB_MODELS"):
        paths.append(Path(os.environ["SUPERLINEAR_LAB_MODELS"]) / name)
    paths.append(_REPO_ROOT / "data" / "models" / name)
    return paths


def save_model(model: HybridLM, path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into directory `path` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(model.cfg.to_json())
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _load_dir(path: Path, device, dtype: torch.dtype, backend: str) -> HybridLM:
    cfg = ModelConfig.from_json((path / "config.json").read_text())
    model = HybridLM(cfg, backend=backend)
    tensors = load_file(str(path / "model.safetensors"))
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise ValueError(f"{path}/model.safetensors: {k} has shape {tuple(t.shape)}, "
                             f"expected {tuple(expected[k].shape)}")
    model.load_state_dict(tensors)
    model.source = {"kind": "directory", "path": str(path), "name": path.name,
                    "files": {f: sha256_file(path / f) for f in ("config.json", "model.safetensors")}}
    return model.to(device=device, dtype=dtype)


def load_model(name: str = "tiny", *, path=None, device: str | torch.device = "cpu", dtype="float32",
               backend: str = "auto", config: ModelConfig | None = None) -> HybridLM:
    """A ready model in eval mode.

    Args:
        name: model name; a directory ``data/models/<name>/`` (see `model_search_paths`) is preferred, else the
            random initialisation of preset `name` (``"tiny"``).
        path: explicit model directory (config.json + model.safetensors); overrides `name`'s search.
        device, dtype: where and in which dtype ("float32", "float16", "bfloat16" or a torch dtype; explicit,
            nothing is cast silently later).
        backend: attention backend of every layer ("auto", "torch", "triton", "oracle").
        config: build a random-initialised model from this config instead of a preset.
    """
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    if path is not None:
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"path={str(path)!r}: expected config.json and model.safetensors there")
        model = _load_dir(path, device, dtype, backend)
        model.model_id = f"superlinear-lab/{path.name}"
        return model.eval()
    if config is None:
        for candidate in model_search_paths(name):
            if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
                model = _load_dir(candidate, device, dtype, backend)
                model.model_id = f"superlinear-lab/{name}"
                return model.eval()
        if name not in PRESETS:
            raise ValueError(f"model {name!r}: no directory in {[str(p) for p in model_search_paths(name)]} and "
                             f"no preset of that name (presets: {sorted(PRESETS)})")
        config = PRESETS[name]()
    model = HybridLM(config, backend=backend).to(device=device, dtype=dtype)
    model.model_id = f"superlinear-lab/{name}-random-init"
    model.source = {"kind": "random-init", "seed": config.init_seed}
    return model.eval()


def model_fingerprint(model: HybridLM) -> tuple[str, dict]:
    """(sha256 hex, payload): canonical JSON of model id, weight path, dtype, config hash, weight-file hashes and
    the schema id (SPEC §6.4). A snapshot loads only into a model with the same fingerprint."""
    dtype = str(model.dtype).replace("torch.", "")
    payload = {
        "schema": FINGERPRINT_SCHEMA,
        "model_id": model.model_id,
        "model_path": model.source.get("name"),  # the directory name: fingerprints survive moving the checkout
        "dtype": dtype,
        "config_sha256": hashlib.sha256(canonical_json(model.cfg.to_dict()).encode()).hexdigest(),
        "files": model.source.get("files", {}),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest(), payload
