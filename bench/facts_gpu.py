"""Prose-fact model on the GPU: a training slice, then held-out evaluation, as one resumable command.

    python bench/facts_gpu.py --ckpt $OUT/ck --config bench/facts_small_config.json --time-limit 420 --out $OUT

1. trains (or resumes) `superlinear_lab.train` for at most `--time-limit` seconds (the checkpoint may live under
   $OUT so that it comes back and can be carried into the next call);
2. exports the checkpoint to `--export-dir` (`--export-dtype`, fp16 by default) when the schedule is done or `--export-anyway`;
3. evaluates the exported model (`--eval-backend`) on the held-out fact suites at 1×, 2×, 4× and 8× the
   longest training length — held-out templates, held-out values, held-out corpus text — with answer accuracy,
   answer-byte and first-byte accuracy, routing recall and the chance-recall baseline; and bits per byte on
   held-out prose against the shipped `tiny` (whose suites run too unless `--skip-tiny-suites`);
4. writes `facts_eval.json` (and the training log tail) under `--out`.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from superlinear_lab import data as D
from superlinear_lab import train as T
from superlinear_lab.evaluate import run_examples, summarize
from superlinear_lab.loaders import open_model

SUITES = ("fact_word", "fact_name", "fact_phrase", "fact_date", "fact_number", "fact_multi_key", "fact_hop", "niah")


@torch.no_grad()
def bits_per_byte(model, length: int, rows: int, seed: int = 0) -> float:
    """Mean next-byte cross-entropy in bits over `rows` windows of held-out corpus text."""
    rng = random.Random(f"bpb:{seed}")
    total, count = 0.0, 0
    for _ in range(rows):
        ids = torch.tensor([[D._TOKENIZER.bos_id] + D.text_window(rng, length - 1, "eval")], device=model.device)
        logits = model(ids).float()
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total += float(ce)
        count += ids.shape[1] - 1
    return total / count / math.log(2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--time-limit", type=float, default=420)
    p.add_argument("--backend", default="oracle", help="training backend")
    p.add_argument("--eval-backend", default="triton")
    p.add_argument("--export-dir", default="runs/facts_export", help="where the fp16 export is written")
    p.add_argument("--skip-tiny-suites", action="store_true", help="bits per byte only for tiny")
    p.add_argument("--seeds", type=int, default=16, help="held-out examples per suite and length")
    p.add_argument("--lengths", type=int, nargs="+", help="default: 1, 2, 4 and 8 times the longest training length")
    p.add_argument("--export-anyway", action="store_true")
    p.add_argument("--export-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--save-seconds", type=float, default=0, help="also checkpoint every this many seconds")
    p.add_argument("--workers", type=int, default=0, help="build training batches in this many processes")
    p.add_argument("--plan-seconds", type=float, help="on a fresh checkpoint, first resize the stages' step counts "
                   "to about this many seconds here (train.plan), writing the planned config to <out>/config.json")
    p.add_argument("--plan-shares", type=float, nargs="+", help="share of the time per stage (default: plan's)")
    p.add_argument("--suites", nargs="+", default=list(SUITES), help="evaluation suites, in this order "
                   "(digit tasks of superlinear_lab.data too, e.g. multi_key multi_hop)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="rows per evaluation forward: as many as fit "
                   "this many tokens (at least one)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-eval", action="store_true", help="train (and export) only: a middle slice of a run")
    p.add_argument("--eval-only", metavar="MODEL", help="only evaluate this model (a shipped name or a model "
                   "folder; needs --lengths): no training, no export, no other model")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = T.load_config(args.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.skip_eval and (args.skip_train or args.eval_only):
        p.error("--skip-eval trains: it cannot go with --skip-train or --eval-only")
    if args.eval_only and not args.lengths:
        p.error("--eval-only needs --lengths")
    if args.plan_seconds and not args.eval_only and not (Path(args.ckpt) / "state.json").is_file():
        D.use_corpus(cfg.corpus)
        shares = tuple(args.plan_shares) if args.plan_shares else (0.1, 0.15, 0.2, 0.25, 0.3)[-len(cfg.stages):]
        cfg = T.plan(cfg, args.plan_seconds, device, args.backend, shares=shares)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        print("planned stages", cfg.stages, flush=True)
    report: dict = {"config": args.config, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    if not args.skip_train and not args.eval_only:
        t0 = time.time()
        state = T.train(cfg, args.ckpt, device, args.backend, time_limit=args.time_limit, progress=False,
                        save_seconds=args.save_seconds, workers=args.workers)
        report["train"] = {"step": state["step"], "total_steps": cfg.total_steps, "elapsed_s": state["elapsed_s"],
                           "slice_s": round(time.time() - t0, 1)}
        log = (Path(args.ckpt) / T.LOG_FILE).read_text().strip().split("\n")
        (out / "train_log_tail.jsonl").write_text("\n".join(log[-40:]) + "\n")
        print(json.dumps(report["train"]))
        if state["step"] < cfg.total_steps and not args.export_anyway:
            (out / "facts_eval.json").write_text(json.dumps(report, indent=1))
            return 0
    if args.skip_eval:  # here the schedule is done or --export-anyway is set (an unfinished slice returned above)
        T.export(args.ckpt, args.export_dir, args.export_dtype)
        (out / "facts_eval.json").write_text(json.dumps(report, indent=1))
        return 0
    D.use_corpus(cfg.corpus)
    longest = max(s[0] for s in cfg.stages)
    lengths = args.lengths or [longest * m for m in (1, 2, 4, 8)]
    if args.eval_only:
        models = {args.eval_only: open_model(args.eval_only, device=device, backend=args.eval_backend)}
    else:
        export = T.export(args.ckpt, args.export_dir, args.export_dtype)
        models = {"new": open_model(str(export), device=device, backend=args.eval_backend),
                  "tiny": open_model("tiny", device=device, backend=args.eval_backend)}
    report["bits_per_byte"] = {name: round(bits_per_byte(m, min(longest, max(lengths)), 16), 4)
                               for name, m in models.items()}
    print("bits per byte", report["bits_per_byte"])
    report["suites"] = {}
    for name, model in models.items():
        if name == "tiny" and args.skip_tiny_suites:
            continue
        layers = [i for i, _ in model.routing_layers()]
        for task in args.suites:
            for length in lengths:
                t0 = time.time()
                exs = [D.make_example(task, length, s, "eval") for s in range(args.seeds)]
                s = summarize(run_examples(model, exs, batch_size=max(1, args.eval_tokens // length)), layers)
                row = {k: s[k] for k in ("accuracy", "byte_accuracy", "first_byte_accuracy", "recall_any",
                                         "chance_any", "chance_head", "routed_examples", "per_head")}
                row["best_head"] = s["best_head"]["recall"]
                row["seconds"] = round(time.time() - t0, 1)
                report["suites"].setdefault(name, {}).setdefault(task, {})[str(length)] = row
                print(name, task, length, {k: v for k, v in row.items() if k != "per_head"}, flush=True)
                (out / "facts_eval.json").write_text(json.dumps(report, indent=1))
    (out / "facts_eval.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
