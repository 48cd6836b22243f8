"""CPU dry run of session 12's arm configs through the code path bench/facts_gpu.py trains with (no training).

    OMP_NUM_THREADS=1 python bench/facts_s12/dryrun.py bench/facts_s12_A.json bench/facts_s12_B.json --steps 2

Per config: `train.load_config` (what facts_gpu.py calls), the task mix (every task built by `data.make_example`,
fractions summing to 1), the start weights through `train._init_weights` (the architecture check `train.train` makes
on a fresh run; an fp16 export is upcast), the corpus `data.use_corpus(cfg.corpus)`, and `--steps` batches at the
start of each stage from `train._batches` (the iterator `train.train` draws from): their steps, lengths, batch sizes
and tasks. Prints one JSON line per config; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch

from superlinear_lab import data as D
from superlinear_lab import train as T
from superlinear_lab.model import HybridLM, ModelConfig


def check(path: str, steps: int = 2) -> dict:
    cfg = T.load_config(path)
    problems = []
    if cfg.corpus and Path(cfg.corpus).is_dir():
        D.use_corpus(cfg.corpus)
        corpus = D.corpus_fingerprint()
    else:
        corpus = f"MISSING {cfg.corpus}: Python docs used"
        problems.append(corpus)
    for task in sorted(cfg.task_mix):  # a name make_example does not build raises only when a batch draws it
        try:
            D.make_example(task, 2048, 0, "train")
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            problems.append(f"task {task}: {exc!r}")
    total = sum(cfg.task_mix.values())
    if not math.isclose(total, 1.0, abs_tol=1e-9):
        problems.append(f"task mix sums to {total}")
    model = HybridLM(ModelConfig.from_dict(cfg.model))
    T._init_weights(model, cfg)  # raises on another architecture (unless cfg.widen_init widens it)
    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().to(torch.float32).numpy().tobytes())
    batches, start = [], 0
    for length, n, batch in cfg.stages:
        for step, examples in T._batches(cfg, start, start + min(steps, n), workers=0):
            if {len(ex.ids) for ex in examples} != {length} or len(examples) != batch:
                problems.append(f"step {step}: lengths {sorted({len(ex.ids) for ex in examples})}, "
                                f"batch {len(examples)} (stage {length} x {batch})")
            for ex in examples:
                if not ex.answer[0] < ex.answer[1] <= len(ex.ids) and ex.task != "text":
                    problems.append(f"step {step}: {ex.task} answer {ex.answer}")
            batches.append({"step": step, "length": length, "tasks": dict(Counter(ex.task for ex in examples))})
        start += n
    return {"config": path, "init_from": cfg.init_from, "init_sha256": digest.hexdigest()[:16],
            "seed": cfg.seed, "lr": cfg.lr, "stages": cfg.stages, "corpus": corpus,
            "task_mix": {k: cfg.task_mix[k] for k in sorted(cfg.task_mix, key=cfg.task_mix.get, reverse=True)},
            "batches": batches, "problems": problems}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--steps", type=int, default=2, help="batches built at the start of each stage")
    args = p.parse_args(argv)
    bad = 0
    for path in args.configs:
        res = check(path, args.steps)
        print(json.dumps(res))
        bad += bool(res["problems"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
