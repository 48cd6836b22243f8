"""superlinear_lab.loaders: `open_model(spec)` (a shipped name, our model directory or a Superlinear-Exp
checkpoint -> a loaded model); open Superlinear-Exp-style checkpoints (Hugging Face layout: config.json +
safetensors shards) with no remote code and no pickle, and plan GPU memory before trying.

* `load_checkpoint(path, device=..., dtype=...)` -> `SuperlinearExpLM` (works with `Session`, `SnapshotStore`,
  `RoutingTrace` and the views); `save_checkpoint` writes the same layout.
* `plan_memory(config_or_path, gpu_bytes, sessions=1, dtype=...)` -> `MemoryPlan`.
* `SuperlinearExpConfig` (``.released()`` = Superlinear-Exp-v0.1, docs/algorithm.md §5), `KEY_MAP` (assumed tensor names),
  `CheckpointError` (every refusal; names the file and the key).

The model needs the optional extra ``hf`` (transformers' NemotronH modules); the planner does not.
"""
from .checkpoint import FP32_ALLOWED, KEY_MAP, checkpoint_names, load_checkpoint, save_checkpoint
from .config import MODEL_TYPE, RELEASED_PATTERN, CheckpointError, SuperlinearExpConfig, read_json_lenient
from .files import read_safetensors_header
from .memory import MemoryPlan, format_bytes, parse_bytes, parse_tokens, plan_memory
from .open import FORMATS, ModelFormat, open_model

__all__ = ["open_model", "FORMATS", "ModelFormat", "load_checkpoint", "save_checkpoint", "plan_memory", "MemoryPlan", "SuperlinearExpConfig",
           "CheckpointError", "KEY_MAP", "FP32_ALLOWED", "checkpoint_names", "MODEL_TYPE", "RELEASED_PATTERN",
           "read_json_lenient", "read_safetensors_header", "parse_bytes", "parse_tokens", "format_bytes",
           "SuperlinearExpLM"]


def __getattr__(name):
    # The model class imports torch modules from transformers lazily, so the planner works without the extra.
    if name == "SuperlinearExpLM":
        from .model import SuperlinearExpLM

        return SuperlinearExpLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
