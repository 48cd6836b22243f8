"""`open_model(spec)`: one way from what a user types (``--model NAME|PATH``) to a loaded model.

A directory is tried against `FORMATS` in order; the first entry whose ``detect(path, config)`` accepts it
(``config`` = its parsed ``config.json``) loads it:

* ``superlinear-lab`` — our model directory: ``config.json`` (model_type ``superlinear-lab-hybrid``) and
  ``model.safetensors`` (`superlinear_lab.model.load_model(path=...)`);
* ``superlinear-exp`` — a Superlinear-Exp checkpoint: ``config.json`` (model_type ``superlinear-exp``) and
  safetensors shards (`load_checkpoint`; needs the ``hf`` extra);
* ``transformers`` — a local Hugging Face causal-LM directory (``architectures: [...ForCausalLM]``), converted to
  superlinear attention and wrapped as an `HFModel` (`superlinear_lab.hf.open`; needs the ``hf`` extra).

A spec that is not a directory is a shipped model name (``"tiny"``). Nothing here initialises random weights:
that stays the explicit ``load_model(name, random_init=True)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..model.config import MODEL_TYPE as OUR_MODEL_TYPE
from .config import MODEL_TYPE as EXP_MODEL_TYPE
from .config import CheckpointError, read_json_lenient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFormat:
    name: str  # shown in errors and logs
    detect: Callable[[Path, dict], bool]  # detect(directory, parsed config.json) -> this format?
    load: Callable  # load(path: Path, *, device, dtype, backend) -> model


def _model_type_is(model_type: str) -> Callable[[Path, dict], bool]:
    return lambda path, config: config.get("model_type") == model_type


def _load_ours(path: Path, *, device, dtype, backend):
    from ..model import load_model

    return load_model(path=path, device=device, dtype=dtype or "float32", backend=backend)


def _load_exp(path: Path, *, device, dtype, backend):
    from .checkpoint import load_checkpoint

    return load_checkpoint(path, device=device, dtype=dtype, backend=backend)


def _hf_detect(path: Path, config: dict) -> bool:
    from ..hf.open import detect

    return detect(path, config)


def _load_hf(path: Path, *, device, dtype, backend):
    from ..hf.open import load

    return load(path, device=device, dtype=dtype, backend=backend)


FORMATS: list[ModelFormat] = [  # first match wins: our own formats before the general transformers one
    ModelFormat("superlinear-lab", _model_type_is(OUR_MODEL_TYPE), _load_ours),
    ModelFormat("superlinear-exp", _model_type_is(EXP_MODEL_TYPE), _load_exp),
    ModelFormat("transformers", _hf_detect, _load_hf),
]


def open_model(spec, *, device="cpu", dtype=None, backend: str = "auto"):
    """Load the model that `spec` names, in eval mode, carrying `model.model_id` and `model.source`.

    Args:
        spec: a shipped model name (``"tiny"``), or a directory in one of `FORMATS` (our ``config.json`` +
            ``model.safetensors``, or a Superlinear-Exp checkpoint).
        device: torch device for the weights.
        dtype: "float32", "float16", "bfloat16" or None (each format's default: float32 for ours, the
            checkpoint's declared dtype for Superlinear-Exp).
        backend: attention backend ("auto", "torch", "triton", "oracle").

    Raises:
        FileNotFoundError: `spec` looks like a path but does not exist, or a shipped model's files are missing.
        ValueError: a directory in no known format, or an unknown name (the message lists what was expected).
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"model {text!r}: directory has no config.json; expected one of "
                             f"{[f.name for f in FORMATS]} (a model directory or a checkpoint)")
        try:
            parsed = read_json_lenient(config)
        except CheckpointError as e:
            raise ValueError(f"model {text!r}: {e}") from None
        for fmt in FORMATS:
            if fmt.detect(path, parsed):
                log.info("opening %s as %s", path, fmt.name)
                return fmt.load(path, device=device, dtype=dtype, backend=backend)
        raise ValueError(f"model {text!r}: config.json has model_type={parsed.get('model_type')!r}, which none of "
                         f"the formats {[f.name for f in FORMATS]} reads")
    if path.exists():
        raise ValueError(f"model {text!r}: a file; expected a model directory or a shipped model name")
    if any(sep in text for sep in ("/", "\\")) or text.startswith((".", "~")):
        raise FileNotFoundError(f"model {text!r}: no such directory")
    from ..model import load_model

    return load_model(text, device=device, dtype=dtype or "float32", backend=backend)
