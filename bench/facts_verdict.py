"""Issue 13's re-ship decision, computed from evaluation files rather than by hand.

A shipping evaluation runs `bench/facts_gpu.py --eval-only` as many processes (one per model, suites and lengths), each
writing its own ``facts_eval.json``; this script merges them into one report (``suites[model][task][length]``, the
shape `bench/facts_table.py` reads) and applies the rule fixed before training (session 11's rule; every threshold
is an option):

(a) the candidate's mean exact accuracy over the seven fact suites (`superlinear_lab.facts.TASKS`) and the lengths
    is at least the baseline's plus ``--mean-margin`` points;
(b) no fact suite's mean over the lengths falls more than ``--suite-drop`` points below the baseline's;
(c) NIAH: at no length more than ``--niah-rows`` rows below the baseline (rows = accuracy x ``--seeds``), and its
    mean over the lengths at least the baseline's less ``--niah-mean`` points;
(d) bits per byte at most the baseline's plus ``--bpb-margin``;
(e) held-out real documents (`bench/facts_realdoc.py` outputs, ``--realdoc CAND BASE``): the candidate's accuracy per
    kind at least the baseline's — only when given.

Every cell must be present for both models: a missing cell is an error, never a pass.

    python bench/facts_verdict.py --candidate runs/s11_final --baseline small ev/*/facts_eval.json \\
        --realdoc ev/realdoc_cand.json ev/realdoc_small.json --out merged.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FACT_SUITES = ("fact_word", "fact_name", "fact_phrase", "fact_date", "fact_number", "fact_multi_key", "fact_hop")


def merge(reports: list[dict]) -> dict:
    """One report from several `facts_gpu.py` outputs: suites and bits per byte united; a (model, suite, length)
    cell in two files must agree, else ValueError (two runs of one cell are not silently averaged)."""
    out: dict = {"suites": {}, "bits_per_byte": {}}
    for rep in reports:
        for model, bpb in rep.get("bits_per_byte", {}).items():
            if model in out["bits_per_byte"] and abs(out["bits_per_byte"][model] - bpb) > 1e-3:
                raise ValueError(f"bits per byte of {model}: {out['bits_per_byte'][model]} vs {bpb}")
            out["bits_per_byte"][model] = bpb
        for model, suites in rep.get("suites", {}).items():
            for task, rows in suites.items():
                for length, row in rows.items():
                    have = out["suites"].setdefault(model, {}).setdefault(task, {})
                    if length in have and have[length]["accuracy"] != row["accuracy"]:
                        raise ValueError(f"{model} {task} {length}: two different results")
                    have[length] = row
    return out


def _means(report: dict, model: str, lengths: list[str]) -> dict[str, float]:
    """Per suite the mean exact accuracy (percent) over `lengths`; KeyError names a missing cell."""
    suites = report["suites"].get(model)
    if suites is None:
        raise KeyError(f"no results for model {model!r} (have {sorted(report['suites'])})")
    out = {}
    for task in (*FACT_SUITES, "niah"):
        missing = [n for n in lengths if n not in suites.get(task, {})]
        if missing:
            raise KeyError(f"{model}: {task} lacks lengths {missing}")
        out[task] = sum(100 * suites[task][n]["accuracy"] for n in lengths) / len(lengths)
    return out


def verdict(report: dict, candidate: str, baseline: str, *, seeds: int = 32, mean_margin: float = 3.0,
            suite_drop: float = 5.0, niah_rows: int = 2, niah_mean: float = 3.2, bpb_margin: float = 0.05,
            realdoc: tuple[dict, dict] | None = None) -> dict:
    """The criteria as {name: {"ok": bool, ...the figures}} plus "ship": all ok. Lengths: every length the
    baseline's word suite has (the candidate must have them all)."""
    lengths = sorted(report["suites"][baseline]["fact_word"], key=int)
    cand, base = _means(report, candidate, lengths), _means(report, baseline, lengths)
    mean_c = sum(cand[t] for t in FACT_SUITES) / len(FACT_SUITES)
    mean_b = sum(base[t] for t in FACT_SUITES) / len(FACT_SUITES)
    out: dict = {"lengths": [int(n) for n in lengths]}
    out["a_mean"] = {"ok": mean_c >= mean_b + mean_margin, "candidate": mean_c, "baseline": mean_b,
                     "needed": mean_b + mean_margin}
    drops = {t: cand[t] - base[t] for t in FACT_SUITES}
    worst = min(drops, key=drops.get)
    out["b_suites"] = {"ok": drops[worst] >= -suite_drop, "worst": worst, "difference": drops[worst],
                       "differences": drops}
    rows = {n: round(seeds * (report["suites"][candidate]["niah"][n]["accuracy"]
                              - report["suites"][baseline]["niah"][n]["accuracy"])) for n in lengths}
    out["c_niah"] = {"ok": min(rows.values()) >= -niah_rows and cand["niah"] >= base["niah"] - niah_mean,
                     "row_differences": rows, "candidate_mean": cand["niah"], "baseline_mean": base["niah"]}
    bpb = report.get("bits_per_byte", {})
    if candidate not in bpb or baseline not in bpb:
        raise KeyError(f"bits per byte missing for {[m for m in (candidate, baseline) if m not in bpb]}")
    out["d_bits_per_byte"] = {"ok": bpb[candidate] <= bpb[baseline] + bpb_margin, "candidate": bpb[candidate],
                              "baseline": bpb[baseline]}
    if realdoc is not None:
        kc, kb = realdoc[0]["kinds"], realdoc[1]["kinds"]
        acc = {k: (kc[k]["accuracy"], kb[k]["accuracy"]) for k in kb if k in kc}
        if not acc:
            raise KeyError("the real-document files share no kind")
        out["e_realdoc"] = {"ok": all(c >= b for c, b in acc.values()), "accuracy": acc}
    out["ship"] = all(v["ok"] for v in out.values() if isinstance(v, dict) and "ok" in v)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="facts_eval.json files of bench/facts_gpu.py (any number of processes)")
    p.add_argument("--candidate", required=True, help="the candidate's model name as the reports write it")
    p.add_argument("--baseline", default="small")
    p.add_argument("--seeds", type=int, default=32, help="held-out rows per cell (converts accuracy to rows)")
    p.add_argument("--mean-margin", type=float, default=3.0)
    p.add_argument("--suite-drop", type=float, default=5.0)
    p.add_argument("--niah-rows", type=int, default=2)
    p.add_argument("--niah-mean", type=float, default=3.2)
    p.add_argument("--bpb-margin", type=float, default=0.05)
    p.add_argument("--realdoc", nargs=2, metavar=("CANDIDATE", "BASELINE"), help="facts_realdoc.py outputs")
    p.add_argument("--out", help="write the merged report with the verdict here")
    args = p.parse_args(argv)
    report = merge([json.loads(Path(f).read_text()) for f in args.reports])
    realdoc = tuple(json.loads(Path(f).read_text()) for f in args.realdoc) if args.realdoc else None
    try:
        v = verdict(report, args.candidate, args.baseline, seeds=args.seeds, mean_margin=args.mean_margin,
                    suite_drop=args.suite_drop, niah_rows=args.niah_rows, niah_mean=args.niah_mean,
                    bpb_margin=args.bpb_margin, realdoc=realdoc)
    except KeyError as exc:
        print(f"cannot decide: {exc}", file=sys.stderr)
        return 2
    for name, c in v.items():
        if isinstance(c, dict):
            print(f"{name:16s} {'met' if c['ok'] else 'FAILS'}  "
                  + json.dumps({k: (round(x, 2) if isinstance(x, float) else x) for k, x in c.items()
                                if k not in ("ok", "differences")}))
    print("ship" if v["ship"] else "do not ship")
    if args.out:
        Path(args.out).write_text(json.dumps({**report, "verdict": v}, indent=1) + "\n")
    return 0 if v["ship"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
