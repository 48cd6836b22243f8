"""Retrofit: turn a dense transformers causal LM into its superlinear version by a short distillation.

The student is the model converted with ``search_query="proj"``: each converted layer gets a Q1 projection
initialised from its ``q_proj`` (so step 0 is the training-free conversion). ``train="q1"`` (default) trains only
Q1 and the teacher is the same model with every layer dense (`dense(model)`), so no second copy is held;
``train="attention"`` also trains every parameter of the converted attention layers (their q/k/v/o projections),
against a frozen dense copy made at the start. Losses: ``kl`` (teacher ‖ student next-token distributions), ``mse``
(per converted layer, attention output of student vs teacher) or ``kl+mse``.

Resumable: every ``save_every`` steps ``<out>/state.json`` (step, settings, history) and ``<out>/trainable.safetensors``
/ ``<out>/optimizer.safetensors`` are written atomically; a rerun with the same ``out`` continues from there (the
batch of step i depends only on (seed, i)); a rerun may raise ``steps`` to train further (the learning-rate
schedule is then the one of the new total). The result, ``<out>/model``, loads with `from_pretrained`:
``superlinear_lab.hf.from_pretrained(path)`` (dense weights by transformers' own loader, plus
``superlinear_search.safetensors``).

Command line (`superlinear_lab.hf.retrofit`; offline text only: Python's docs by default, or ``--text FILE ...``)::

    python -m superlinear_lab.hf.retrofit MODEL_DIR --out runs/retro --steps 200 --seq-len 512
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from superlinear_kernels import SpanConfig

from .attention import SearchQueryProjection, convert, converted_layers, dense, attention_modules

log = logging.getLogger(__name__)
LOSSES = ("kl", "mse", "kl+mse")
TRAIN = ("q1", "attention")
STATE_VERSION = 1
SEARCH_FILE = "superlinear_search.safetensors"


@dataclass
class RetrofitSettings:
    """Hyperparameters of a run (stored in state.json; a resumed run must use the same ones)."""

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 3e-3
    loss: str = "kl"
    mse_weight: float = 1.0
    seed: int = 0
    save_every: int = 50
    warmup: int = 10
    train: str = "q1"  # "q1" or "attention" (Q1 and the converted layers' own projections)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an int >= 1")
        if self.train not in TRAIN:
            raise ValueError(f"train={self.train!r}: expected one of {TRAIN}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {LOSSES}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r}: expected a number > 0")


@dataclass
class RetrofitResult:
    """What `retrofit` did: steps run, per-step losses, and where the files are."""

    steps_done: int
    history: list = field(default_factory=list)  # [{"step", "loss", "kl", "mse"}]
    out: Path | None = None
    resumed_from: int = 0  # the step a resumed run started from (0: a fresh run)


# --------------------------------------------------------------------------- data
def token_windows(ids: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [batch, seq_len]: random windows of the 1-D token stream `ids` (len > seq_len)."""
    if ids.numel() <= seq_len:
        raise ValueError(f"text: {ids.numel()} tokens, need more than seq_len={seq_len}")
    starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, seq_len: int, batch_size: int = 8, max_windows: int | None = None) -> float:
    """Mean next-token cross-entropy (nats/token) over consecutive windows of `ids` (1-D)."""
    n = (ids.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"held-out text: {ids.numel()} tokens, need more than seq_len={seq_len}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b0 in range(0, n, batch_size):
        rows = torch.stack([ids[i * seq_len:(i + 1) * seq_len + 1] for i in range(b0, min(n, b0 + batch_size))])
        rows = rows.to(device)
        logits = model(input_ids=rows[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += rows[:, 1:].numel()
    return total / count


# --------------------------------------------------------------------------- checkpoints
def trainable_parameters(model, train: str = "q1") -> dict[str, torch.nn.Parameter]:
    """The parameters `retrofit` trains, by name: the Q1 projections of the converted layers ("q1"), plus every other
    parameter of those attention modules ("attention")."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SearchQueryProjection):
            for pname, p in mod.search.named_parameters():
                out[f"{name}.search.{pname}"] = p
    if train == "attention":
        names = {id(mod): name for name, mod in model.named_modules()}
        for _, mod in attention_modules(model):
            if getattr(mod, "superlinear", None):
                for pname, p in mod.named_parameters():
                    out.setdefault(f"{names[id(mod)]}.{pname}", p)
    return out


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _save_state(out: Path, step: int, params: dict, opt: torch.optim.Optimizer, meta: dict, history: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_save(params, out / "trainable.safetensors")
    moments = {}
    for name, p in params.items():
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                moments[f"{name}.{key}"] = st[key]
        if "step" in st:
            moments[f"{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    _atomic_save(moments, out / "optimizer.safetensors")
    _atomic_json({"version": STATE_VERSION, "step": step, **meta, "history": history}, out / "state.json")


def _load_state(out: Path, params: dict, opt: torch.optim.Optimizer, meta: dict) -> tuple[int, list]:
    state = json.loads((out / "state.json").read_text())
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{out}/state.json: version {state.get('version')!r}, expected {STATE_VERSION}")
    extendable = ("steps", "save_every")  # a run may be continued to a larger total (the schedule follows it)
    saved = dict(state.get("settings") or {})
    if int(saved.get("steps", 0)) > meta["settings"]["steps"]:
        raise ValueError(f"{out}: the saved run planned {saved['steps']} steps; resume with steps >= that")
    for key in ("settings", "layers", "span_configs"):
        have, want = state.get(key), meta[key]
        if key == "settings":
            have = {k: v for k, v in saved.items() if k not in extendable}
            want = {k: v for k, v in want.items() if k not in extendable}
        if have != want:
            raise ValueError(f"{out}: resuming with different {key} ({have!r} != {want!r}); "
                             "use a new --out or the same settings")
    weights = load_file(str(out / "trainable.safetensors"))
    if set(weights) != set(params):
        raise ValueError(f"{out}/trainable.safetensors: tensors {sorted(weights)[:3]}… differ from the model's "
                         f"{sorted(params)[:3]}…")
    moments = load_file(str(out / "optimizer.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
            if f"{name}.exp_avg" in moments:
                opt.state[p] = {"step": moments[f"{name}.step"].reshape(()).clone(),
                                "exp_avg": moments[f"{name}.exp_avg"].to(p.device),
                                "exp_avg_sq": moments[f"{name}.exp_avg_sq"].to(p.device)}
    return int(state["step"]), list(state.get("history", []))


# --------------------------------------------------------------------------- training
def _layer_outputs(model, store: list):
    """Forward hooks collecting each converted attention module's output (its first return value)."""
    handles = []
    for i, mod in attention_modules(model):
        if getattr(mod, "superlinear", None):
            handles.append(mod.register_forward_hook(lambda m, a, out: store.append(out[0] if isinstance(out, tuple)
                                                                                      else out)))
    return handles


def retrofit(model, cfg, ids: torch.Tensor, out=None, *, layers=None, settings: RetrofitSettings | None = None,
             resume: bool = True, progress: bool = True, allow_gaps: bool = False,
             time_limit: float | None = None) -> RetrofitResult:
    """Distil Q1 so the superlinear `model` matches its dense self; trains in place and returns the history.

    Args:
        model: a dense transformers causal LM (or one already converted with ``search_query="proj"``).
        cfg: `SpanConfig` or ``{layer: SpanConfig}`` (as in `convert`).
        ids: int64 [N] training token stream.
        out: directory for resumable state and the final model (None: nothing is written).
        layers: layers to convert (None: all).
        settings: `RetrofitSettings`.
        resume: continue from ``out/state.json`` when it exists.
        time_limit: stop after this many seconds (state saved; a rerun resumes), None for no limit.

    The final model is written to ``out/model`` only when all `settings.steps` are done.
    """
    from tqdm.auto import tqdm

    settings = settings or RetrofitSettings()
    if not converted_layers(model) or any(s.search_query != "proj" for _, s in converted_layers(model)):
        convert(model, cfg, layers=layers, search_query="proj", allow_gaps=allow_gaps)
    states = converted_layers(model)
    params = trainable_parameters(model, settings.train)
    teacher = model
    if settings.train != "q1":  # the student's own weights move: the teacher is a frozen dense copy
        import copy

        teacher = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=settings.lr, weight_decay=0.0)
    meta = {"settings": vars(settings) | {}, "layers": [i for i, _ in states],
            "span_configs": {str(i): s.span_config.to_dict() for i, s in states}}
    out = None if out is None else Path(out)
    step, history = 0, []
    if out is not None and resume and (out / "state.json").exists():
        step, history = _load_state(out, params, opt, meta)
        log.info("retrofit: resuming %s at step %d", out, step)
    resumed_from = step
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the teacher and the student must be deterministic
    teacher.eval()
    for p in teacher.parameters() if teacher is not model else ():
        p.requires_grad_(False)
    sched = lambda s: min(1.0, (s + 1) / settings.warmup) * 0.5 * (1 + math.cos(math.pi * s / settings.steps))
    bar = tqdm(total=settings.steps, initial=step, desc="retrofit", unit="step", disable=not progress)
    began = time.perf_counter()
    try:
        while step < settings.steps:
            if time_limit is not None and time.perf_counter() - began > time_limit:
                if out is not None:
                    _save_state(out, step, params, opt, meta, history)
                log.info("retrofit: time limit reached at step %d; state saved", step)
                break
            gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            batch = token_windows(ids, settings.batch_size, settings.seq_len, gen).to(device)
            teacher_out, student_out = [], []
            with torch.no_grad(), dense(teacher):
                hooks = _layer_outputs(teacher, teacher_out) if "mse" in settings.loss else []
                try:
                    t_logits = teacher(input_ids=batch).logits.float()
                finally:
                    for h in hooks:
                        h.remove()
            hooks = _layer_outputs(model, student_out) if "mse" in settings.loss else []
            try:
                s_logits = model(input_ids=batch).logits.float()
            finally:
                for h in hooks:
                    h.remove()
            kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                          reduction="batchmean") / settings.seq_len
            mse = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student_out, teacher_out)) \
                / max(len(student_out), 1) if student_out else torch.zeros((), device=device)
            loss = (kl if "kl" in settings.loss else 0) + (settings.mse_weight * mse if "mse" in settings.loss else 0)
            for g in opt.param_groups:
                g["lr"] = settings.lr * sched(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            history.append({"step": step, "loss": float(loss.detach()), "kl": float(kl.detach()), "mse": float(mse.detach())})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}")
            if out is not None and (step % settings.save_every == 0 or step == settings.steps):
                _save_state(out, step, params, opt, meta, history)
    finally:
        bar.close()
        for p in params.values():
            p.requires_grad_(False)
        model.train(was_training)
    if out is not None and step >= settings.steps:
        save_pretrained(model, out / "model")
    return RetrofitResult(step, history, out, resumed_from)


# --------------------------------------------------------------------------- export / import
def save_pretrained(model, path) -> Path:
    """Write a converted model: transformers' own files (dense weights, config with its ``superlinear`` section)
    plus ``superlinear_search.safetensors`` (the Q1 projections, when there are any)."""
    path = Path(path)
    wrapped = [(mod, mod.q_proj) for _, mod in attention_modules(model)
               if isinstance(getattr(mod, "q_proj", None), SearchQueryProjection)]
    try:
        for mod, wrap in wrapped:  # transformers saves the layer exactly as the dense architecture has it
            mod.q_proj = wrap.base
        model.save_pretrained(str(path))
    finally:
        for mod, wrap in wrapped:
            mod.q_proj = wrap
    search = trainable_parameters(model)  # the Q1 projections (other trained weights are in model.safetensors)
    if search:
        _atomic_save(search, path / SEARCH_FILE, metadata={"format": "superlinear-lab.search-query"})
    return path


def from_pretrained(path, **kwargs):
    """Load a model written by `save_pretrained` / `retrofit`: transformers' `AutoModelForCausalLM.from_pretrained`
    with ``attn_implementation="superlinear"``, converted as its config's ``superlinear`` section says, with the
    stored Q1 projections. Local files only (``local_files_only=True``): nothing is downloaded."""
    from transformers import AutoModelForCausalLM

    from .attention import register

    register()
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="superlinear", local_files_only=True,
                                                 **kwargs)
    spec = getattr(model.config, "superlinear", None)
    if not isinstance(spec, dict) or "layers" not in spec:
        raise ValueError(f"{path}: config.json has no 'superlinear' section (not written by superlinear_lab.hf)")
    cfgs = {int(i): SpanConfig.from_dict(c) for i, c in spec["layers"].items()}
    for _, mod in attention_modules(model):  # drop the lazy states the loader may have set
        mod.__dict__.pop("superlinear", None)
    convert(model, cfgs, layers=sorted(cfgs), search_query=spec.get("search_query", "q"), allow_gaps=True)
    if spec.get("search_query") == "proj":
        weights = load_file(str(path / SEARCH_FILE))
        params = trainable_parameters(model)
        if set(weights) != set(params):
            raise ValueError(f"{path / SEARCH_FILE}: tensors differ from the model's Q1 projections "
                             f"(missing {sorted(set(params) - set(weights))[:3]}, extra "
                             f"{sorted(set(weights) - set(params))[:3]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
    return model


# --------------------------------------------------------------------------- command line
def text_ids(paths, tokenizer) -> torch.Tensor:
    """int64 [N]: the UTF-8 text of `paths` (None: Python's docs, superlinear_lab.data.corpus) tokenised."""
    if paths:
        text = "\n\n".join(Path(p).read_text(encoding="utf-8") for p in paths)
    else:
        from ..data import corpus

        text = corpus("train").decode("utf-8")
    return torch.tensor(tokenizer.encode(text), dtype=torch.int64)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="superlinear-lab retrofit",
                                description="Distil a dense transformers model into its superlinear version "
                                            "(trains the search query Q1 only).")
    p.add_argument("model", help="local transformers model directory (config.json + safetensors weights)")
    p.add_argument("--out", required=True, help="run directory (resumable state; the result goes to OUT/model)")
    p.add_argument("--text", nargs="*", default=None,
                   help="UTF-8 training text files (default: Python's own docs, offline)")
    p.add_argument("--span", default="default",
                   help="'default', 'release' or JSON SpanConfig fields, e.g. '{\"sw_index\": 4, \"num_spans\": 2}'")
    p.add_argument("--layers", default=None, help="comma-separated layer indices to convert (default: all)")
    p.add_argument("--allow-gaps", action="store_true", help="accept a SpanConfig that breaks coverage")
    for name, default in (("steps", 200), ("batch-size", 8), ("seq-len", 512), ("save-every", 50), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--loss", choices=LOSSES, default="kl")
    p.add_argument("--train", choices=TRAIN, default="q1",
                   help="what trains: the search query Q1 only (default) or also the converted layers' projections")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a run")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return p


def span_config_arg(text: str) -> SpanConfig:
    """'default' | 'release' | JSON fields of SpanConfig."""
    if text == "default":
        return SpanConfig.default()
    if text == "release":
        return SpanConfig.release()
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--span {text!r}: expected 'default', 'release' or a JSON object ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--span {text!r}: expected a JSON object of SpanConfig fields")
    return SpanConfig.default().replace(**fields)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import AutoModelForCausalLM

    from .model import _tokenizer_for

    try:
        cfg = span_config_arg(args.span)
        settings = RetrofitSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                    loss=args.loss, seed=args.seed, save_every=args.save_every, train=args.train)
        layers = None if args.layers is None else [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError as exc:
        print(f"superlinear-lab retrofit: error: {exc}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).to(device)
    tokenizer = None
    if (Path(args.model) / "tokenizer_config.json").exists() or (Path(args.model) / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    try:
        ids = text_ids(args.text, _tokenizer_for(model, tokenizer))
    except ValueError as exc:  # a model without a tokenizer cannot read the text
        print(f"superlinear-lab retrofit: error: {args.model}: {exc}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    result = retrofit(model, cfg, ids, args.out, layers=layers, settings=settings, resume=not args.no_resume,
                      allow_gaps=args.allow_gaps)
    if tokenizer is not None:  # the written model keeps its tokenizer (serve/report read it from the folder)
        tokenizer.save_pretrained(str(Path(args.out) / "model"))
    log.info("retrofit: %d steps in %.1f s; final loss %.4g; model written to %s", result.steps_done,
             time.perf_counter() - began, result.history[-1]["loss"] if result.history else float("nan"),
             Path(args.out) / "model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
