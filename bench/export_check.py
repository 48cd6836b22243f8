"""Export a model folder (config.json + model.safetensors: any folder `load_model(path=...)` reads, normally fp32
weights) in a compact dtype, and check on CPU that the compact file answers held-out rows as the source weights do:
the same exact answers, answer bytes and routing hits on every suite (`superlinear_lab.evaluate.run_examples`, eval
split), how many (query, evidence) pairs each reached, and the largest logit difference.

    python bench/export_check.py --src runs/facts_s6C --out /tmp/small [--dtype float16] [--corpus runs/corpus]
        [--length 1024] [--seeds 4]

Writes <out>/config.json, <out>/model.safetensors and <out>/eval/<fp16|bf16>_check.json; exits 1 when an exact
answer differs. Both models compute in float32 (as `load_model` does by default), so only the rounding of the
weights differs.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from superlinear_lab import data as D
from superlinear_lab import load_model
from superlinear_lab.evaluate import run_examples
from superlinear_lab.model import save_model

from facts_gpu import SUITES  # the held-out suites of the facts evaluation (bench/ is on the path of its scripts)

log = logging.getLogger(__name__)


def compare(reference, compact, task: str, length: int, seeds: int) -> dict:
    """One suite's rows through both models: per-row exact answers and answer bytes, whether every (query,
    evidence) routing hit agrees, and the largest |Δlogit| over all positions of the rows."""
    rows = [D.make_example(task, length, s, "eval") for s in range(seeds)]
    a, b = run_examples(reference, rows, batch_size=4), run_examples(compact, rows, batch_size=4)
    with torch.no_grad():
        ids = torch.tensor([ex.ids for ex in rows])
        dlogit = float((reference(ids) - compact(ids)).abs().max())
    return {"task": task, "length": length, "seeds": seeds,
            "correct_fp32": [r["correct"] for r in a], "correct_compact": [r["correct"] for r in b],
            "bytes_fp32": [r["bytes_right"] for r in a], "bytes_compact": [r["bytes_right"] for r in b],
            "hit_any_same": all(x["hit_any"] == y["hit_any"] for x, y in zip(a, b)),
            "pairs": sum(len(x["hit_any"]) for x in a),
            "pairs_differing": sum(u != v for x, y in zip(a, b) for u, v in zip(x["hit_any"], y["hit_any"])),
            "recall_fp32": sum(sum(x["hit_any"]) for x in a), "recall_compact": sum(sum(y["hit_any"]) for y in b),
            "max_abs_dlogit": round(dlogit, 5)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="fp32 model folder")
    p.add_argument("--out", required=True, help="folder to write (config.json and model.safetensors are replaced)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--corpus", default="runs/corpus", help="held-out text of the rows (default text if absent)")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    reference = load_model(path=args.src, backend="torch")
    save_model(load_model(path=args.src, backend="torch", dtype=args.dtype), out)
    if json.loads((out / "config.json").read_text()) != json.loads((Path(args.src) / "config.json").read_text()):
        raise SystemExit(f"{out}/config.json differs from {args.src}/config.json")
    compact = load_model(path=out, backend="torch")  # float32 compute from the compact file, as users load it
    D.use_corpus(args.corpus if Path(args.corpus).is_dir() else None)
    t0 = time.time()
    rows = []
    for task in SUITES:
        rows.append(compare(reference, compact, task, args.length, args.seeds))
        log.info("%s", json.dumps(rows[-1]))
    report = {"about": f"{args.dtype} export vs the fp32 weights on held-out rows (eval split, corpus "
                       f"{D.corpus_fingerprint()['source']}), CPU, torch backend, both computed in float32",
              "src": str(args.src), "dtype": args.dtype, "torch": torch.__version__,
              "seconds": round(time.time() - t0, 1),
              "same_exact_answers": all(r["correct_fp32"] == r["correct_compact"] for r in rows),
              "same_answer_bytes": all(r["bytes_fp32"] == r["bytes_compact"] for r in rows),
              "same_routing_hits": all(r["hit_any_same"] for r in rows),
              "routing_pairs": sum(r["pairs"] for r in rows),
              "routing_pairs_differing": sum(r["pairs_differing"] for r in rows),
              "reached_pairs_fp32": sum(r["recall_fp32"] for r in rows),
              "reached_pairs_compact": sum(r["recall_compact"] for r in rows),
              "max_abs_dlogit": max(r["max_abs_dlogit"] for r in rows),
              "bytes": (out / "model.safetensors").stat().st_size, "rows": rows}
    (out / "eval").mkdir(exist_ok=True)
    name = {"float16": "fp16", "bfloat16": "bf16"}[args.dtype]
    (out / "eval" / f"{name}_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    return 0 if report["same_exact_answers"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
