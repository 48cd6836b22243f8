"""Open a local transformers model directory as an `HFModel` (for `open_model`, ``report --model``, ``serve --model``).

`detect(path, config)` accepts a directory whose ``config.json`` names a causal-LM architecture transformers knows
(``architectures: ["...ForCausalLM"]``) and that is not one of the project's own formats; `load(path, ...)` loads it
with local files only (nothing downloaded, no remote code), converts it as its config's ``superlinear`` section says
(written by `save_pretrained`/`retrofit`) or, for a dense model, every attention layer with `SpanConfig.default()`
(training-free search), and wraps it with its tokenizer when the directory has one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from superlinear_kernels import SpanConfig

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def detect(path: Path, config: dict) -> bool:
    """True for a transformers causal-LM directory (config.json ``architectures`` ending in ForCausalLM)."""
    arch = config.get("architectures") or []
    return isinstance(arch, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in arch) \
        and config.get("model_type") not in ("superlinear-lab-hybrid", "superlinear-exp")


def load(path, *, device="cpu", dtype=None, backend: str = "auto", span: SpanConfig | None = None):
    """`HFModel` for the transformers directory `path`, converted (see the module docstring), in eval mode."""
    from ..model.io import sha256_file
    from .attention import convert, set_backend
    from .model import HFModel
    from .distill import from_pretrained

    path = Path(path)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)} or None")
    kwargs = {} if dtype is None else {"dtype": _DTYPES[dtype]}
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except RecursionError:
        raise ValueError(f"{path / 'config.json'}: not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'}: expected a JSON object")
    if isinstance(config.get("superlinear"), dict):
        model = from_pretrained(path, **kwargs)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
        convert(model, span or SpanConfig.default())
    set_backend(model, backend)
    model.to(device).eval()
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    files = {f.name: sha256_file(f) for f in sorted(path.iterdir())
             if f.is_file() and f.suffix in (".json", ".safetensors")}
    weights = [d for n, d in files.items() if n.endswith(".safetensors")]
    source = {"kind": "transformers", "name": path.name, "path": str(path),
              "weights_sha256": weights[0] if len(weights) == 1 else None, "files": files}
    wrapped = HFModel(model, tokenizer, model_id=f"hf/{path.name}", source=source)
    log.info("opened %s as a transformers model (%s)", path, type(model).__name__)
    return wrapped
