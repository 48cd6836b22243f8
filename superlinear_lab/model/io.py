"""Model weights on disk (``config.json`` + ``model.safetensors``, never pickle), `load_model`, the identity a
loaded model carries (`model.model_id`, `model.source`, `describe_model`) and the model fingerprint that
snapshots check (docs/algorithm.md §6.4).

Shipped models are package data: ``superlinear_lab/models/<name>/`` holds ``config.json``, ``model.safetensors``
and the model card, found through `importlib.resources` the same way from a wheel and from a checkout.
`load_model(name)` loads ``$SUPERLINEAR_LAB_MODELS/<name>/`` when that exists, else the shipped directory; when
neither has the files it raises. Random weights come only from an explicit ``random_init=True`` (or ``config=``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .hybrid import HybridLM

log = logging.getLogger(__name__)

FINGERPRINT_SCHEMA = "superlinear-lab.model-fingerprint.v1"
PRESETS = {"tiny": ModelConfig.tiny}  # configs for explicit random initialisation
SHIPPED = ("tiny", "small")  # models whose weights ship inside the package
MODEL_FILES = ("config.json", "model.safetensors")
MODELS_ENV = "SUPERLINEAR_LAB_MODELS"
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


def shipped_models_dir() -> Path:
    """The package folder that holds the shipped models (``superlinear_lab/models``), wheel or checkout alike."""
    return Path(str(resources.files("superlinear_lab") / "models"))


def has_model_files(path) -> bool:
    """True when directory `path` holds ``config.json`` and ``model.safetensors``."""
    return all((Path(path) / f).is_file() for f in MODEL_FILES)


def model_search_paths(name: str) -> list[Path]:
    """Directories `load_model(name)` looks in, in order: ``$SUPERLINEAR_LAB_MODELS/<name>``, then the shipped
    ``superlinear_lab/models/<name>``."""
    paths = []
    if os.environ.get(MODELS_ENV):
        paths.append(Path(os.environ[MODELS_ENV]) / name)
    paths.append(shipped_models_dir() / name)
    return paths


def save_model(model: HybridLM, path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into directory `path` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(model.cfg.to_json())
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _load_dir(path: Path, kind: str, device, dtype: torch.dtype, backend: str) -> HybridLM:
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
    files = {f: sha256_file(path / f) for f in MODEL_FILES}
    model.model_id = f"superlinear-lab/{path.name}"
    model.source = {"kind": kind, "name": path.name, "path": str(path),
                    "weights_sha256": files["model.safetensors"], "files": files}
    log.info("loaded %s", describe_model(model))
    return model.to(device=device, dtype=dtype)


def _random_model(name: str, config: ModelConfig, device, dtype: torch.dtype, backend: str) -> HybridLM:
    model = HybridLM(config, backend=backend).to(device=device, dtype=dtype)
    model.model_id = f"superlinear-lab/{name}-random-init"
    model.source = {"kind": "random-init", "name": f"{name}-random-init", "path": None, "weights_sha256": None,
                    "seed": config.init_seed}
    log.info("built %s", describe_model(model))
    return model


def load_model(name: str = "tiny", *, path=None, random_init: bool = False, config: ModelConfig | None = None,
               device: str | torch.device = "cpu", dtype="float32", backend: str = "auto") -> HybridLM:
    """A ready model in eval mode, carrying its identity (`model.model_id`, `model.source`; see `describe_model`).

    Args:
        name: a model name: ``$SUPERLINEAR_LAB_MODELS/<name>/`` if that directory holds the files, else the
            model shipped in the package (``"tiny"``, ``"small"``).
        path: explicit model directory (config.json + model.safetensors); overrides `name`'s search.
        random_init: build the seeded random initialisation of preset `name` instead of loading weights. This is
            the only way to get random weights from a name.
        config: build a random-initialised model from this config (explicit, like `random_init`).
        device, dtype: where and in which dtype ("float32", "float16", "bfloat16" or a torch dtype; explicit,
            nothing is cast silently later).
        backend: attention backend of every layer ("auto", "torch", "triton", "oracle").

    Raises:
        FileNotFoundError: `path` lacks the files, or shipped model `name` lacks them (a broken install).
        ValueError: an unknown `name`, a bad `dtype`, or conflicting arguments.
    """
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    chosen = [arg for arg, given in (("path", path is not None), ("random_init", random_init),
                                     ("config", config is not None)) if given]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} given together: expected at most one of path, random_init, config")
    if config is not None:
        return _random_model(name, config, device, dtype, backend).eval()
    if random_init:
        if name not in PRESETS:
            raise ValueError(f"name={name!r} with random_init=True: expected a preset ({sorted(PRESETS)})")
        return _random_model(name, PRESETS[name](), device, dtype, backend).eval()
    if path is not None:
        path = Path(path)
        if not has_model_files(path):
            raise FileNotFoundError(f"path={str(path)!r}: expected {' and '.join(MODEL_FILES)} there")
        return _load_dir(path, "directory", device, dtype, backend).eval()
    searched = model_search_paths(name)
    for candidate in searched:
        if has_model_files(candidate):
            kind = "shipped" if candidate == searched[-1] else "directory"
            return _load_dir(candidate, kind, device, dtype, backend).eval()
    where = ", ".join(str(p) for p in searched)
    if name in SHIPPED:
        untrained = (f"load_model({name!r}, random_init=True)" if name in PRESETS else
                     "load_model(config=ModelConfig.from_json(...)) with the architecture's config.json")
        raise FileNotFoundError(
            f"model {name!r}: its weight files ({', '.join(MODEL_FILES)}) are missing from {where}; the package "
            f"install is incomplete (reinstall superlinear-lab). For untrained weights ask explicitly: {untrained}")
    raise ValueError(f"model name {name!r}: no directory with {' and '.join(MODEL_FILES)} in {where}, and not a "
                     f"shipped model (shipped: {list(SHIPPED)}); pass path=DIR for a model directory")


def describe_model(model) -> str:
    """One line naming `model` and its weights, for reports, traces and views: model id, where the weights came
    from and the first 12 hex digits of their sha256, or a loud RANDOM WEIGHTS for a random initialisation."""
    source = getattr(model, "source", None) or {}
    model_id = getattr(model, "model_id", type(model).__name__)
    if source.get("kind") == "random-init":
        return f"{model_id} (RANDOM WEIGHTS, seed {source.get('seed')})"
    digest = source.get("weights_sha256")
    weights = f"weights sha256 {digest[:12]}" if digest else "weights of unknown origin"
    return f"{model_id} ({source.get('kind', 'unknown source')}, {weights})"


def model_fingerprint(model: HybridLM) -> tuple[str, dict]:
    """(sha256 hex, payload): canonical JSON of model id, weight path, dtype, config hash, weight-file hashes and
    the schema id (docs/algorithm.md §6.4). A snapshot loads only into a model with the same fingerprint."""
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
