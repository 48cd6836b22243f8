"""Compact resumable checkpoints of a `superlinear_lab.train` run, sized for the device machine's limits (#13 s12).

A training checkpoint of `small`'s architecture is ~34 MB (fp32 weights and both AdamW moments, 11.2 MB each). What
comes back from a device call is at most 8 files of 16 MiB, 64 MiB in all, and what travels to one is 64 MiB with the
working tree (28 MB) and the corpus (11 MB), so two arms' checkpoints cannot come back or travel as they are.

    python bench/facts_s12/ckpt.py pack CKPT PREFIX     # -> PREFIX_model.safetensors, PREFIX_moments.safetensors
    python bench/facts_s12/ckpt.py unpack PREFIX CKPT   # -> a checkpoint train.train resumes
    python bench/facts_s12/ckpt.py config CKPT OUT      # the run's own (planned) TrainConfig as JSON

``pack``: PREFIX_model.safetensors (11.3 MB) holds the weights in fp32 with state.json and log.jsonl in its
metadata; PREFIX_moments.safetensors (5.6 MB) AdamW's second moment in bf16 (keys ``exp_avg_sq.<param>``). The first
moment is not kept: with it the files of one short arm, the other arm's export, the corpus and the tree (28 MB) come
to 68 MB, over what may travel. ``unpack``: the weights, the state (step, tokens, AdamW step counts, config) and the
log come back exactly; the second moment is upcast from bf16, the first starts at zero (β1 0.9: re-estimated within
~10 steps); where the moments file is absent (both arms short: dropped to fit the carry) both start at zero (β2 0.95:
~20-60 steps). The step counts stay, so the bias correction is off: the first updates are smaller than usual (a
restarted first moment alone: never larger; both restarted: at most ~10 % larger for a few tens of steps). Weights,
LR schedule and data order stay exact. It also writes ``train_config.json`` into CKPT, the config the run was
planned with: resume with ``--config CKPT/train_config.json``, since facts_gpu.py plans only a fresh run and
`train.train` refuses a checkpoint made with another config.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MODEL, MOMENTS = "_model.safetensors", "_moments.safetensors"
FILES = ("model.safetensors", "optimizer_exp_avg.safetensors", "optimizer_exp_avg_sq.safetensors")


def pack(ckpt: str | Path, prefix: str | Path) -> list[Path]:
    """Write PREFIX_model.safetensors and PREFIX_moments.safetensors from the checkpoint folder `ckpt`."""
    ckpt, prefix = Path(ckpt), str(prefix)
    state = (ckpt / "state.json").read_text()
    log_path = ckpt / "log.jsonl"
    meta = {"state": state, "log": log_path.read_text() if log_path.is_file() else ""}
    weights = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v.float().contiguous() for k, v in weights.items()}, prefix + MODEL, metadata=meta)
    moments = {f"exp_avg_sq.{name}": v.to(torch.bfloat16).contiguous()
               for name, v in load_file(str(ckpt / "optimizer_exp_avg_sq.safetensors")).items()}
    save_file(moments, prefix + MOMENTS)
    return [Path(prefix + MODEL), Path(prefix + MOMENTS)]


def write_config(ckpt: str | Path, out: str | Path) -> Path:
    """The TrainConfig the checkpoint was made with (state.json's "config") as a config file."""
    state = json.loads((Path(ckpt) / "state.json").read_text())
    Path(out).write_text(json.dumps(state["config"], indent=1) + "\n")
    return Path(out)


def unpack(prefix: str | Path, ckpt: str | Path) -> dict:
    """Write a train.train checkpoint into `ckpt` from pack's files; returns {"step", "moments": "second, bf16" |
    "zero"}."""
    prefix, ckpt = str(prefix), Path(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    with safe_open(prefix + MODEL, framework="pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["state"])
    moments = {key: {n: torch.zeros_like(weights[n]) for n in state["adam_steps"]} for key in ("exp_avg", "exp_avg_sq")}
    kind = "zero"
    moments_path = Path(prefix + MOMENTS)
    if moments_path.is_file():
        packed = load_file(str(moments_path))
        moments["exp_avg_sq"] = {n: packed[f"exp_avg_sq.{n}"].float().contiguous() for n in state["adam_steps"]}
        kind = "second, bf16"
    for name, obj in zip(FILES, (weights, moments["exp_avg"], moments["exp_avg_sq"])):
        save_file(obj, str(ckpt / name))
    (ckpt / "state.json").write_text(meta["state"])
    (ckpt / "log.jsonl").write_text(meta["log"])
    write_config(ckpt, ckpt / "train_config.json")
    return {"step": state["step"], "moments": kind}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("ckpt")
    a.add_argument("prefix")
    a = sub.add_parser("unpack")
    a.add_argument("prefix")
    a.add_argument("ckpt")
    a = sub.add_parser("config")
    a.add_argument("ckpt")
    a.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        for f in pack(args.ckpt, args.prefix):
            print(f, f.stat().st_size)
    elif args.cmd == "unpack":
        print(json.dumps(unpack(args.prefix, args.ckpt)))
    else:
        print(write_config(args.ckpt, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
