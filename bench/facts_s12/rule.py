"""Session 12's fixed rule for issue 13 as code (bench/facts_s12/RULE.md says it in words; the two must agree).

    python bench/facts_s12/rule.py pick sel/*.json --a runs/s12/A --b runs/s12/B --out pick.json   # prints A or B
    python bench/facts_s12/rule.py missing ev/*/facts_eval.json --models runs/s12/A small   # "model suite length"

``pick`` reads `bench/facts_select.py` outputs (finished or partial) of the two arms on train-split rows:
1. the selection cells are the seven suites at 65,536 tokens that both arms finished; fewer than ``MIN_CELLS`` of
   them -> the control arm (B);
2. E_A, E_B = exact rows summed over those cells, n = the rows compared; R_A, R_B = rival pull (mean probability
   on rival names' first bytes at the answer's first byte) on the fact_name cell at 8,192 tokens, when it finished;
3. provisional pick: the arm with more exact rows if |E_A - E_B| > 1 % of n; else the arm with the lower rival
   pull if |R_A - R_B| >= 0.01; else the arm with the lower answer NLL averaged over the cells;
4. veto: when the provisional pick's rival pull is at least twice the other's and at least 0.02 above it, and its
   exact lead is below 5 % of n, the other arm is picked (session 11: `final` led by 4 of 256 rows at 64K with
   a train-split pull of 0.063 against cont's 0.007, and lost 7.8 points of held-out names).

``pick --hop-gate GATE`` is session 14's rule (bench/facts_s14/RULE.md): when GATE (written by ``hop-gate``) passed
and arm A's exact rows are at least E_B - 2 % of n, A is picked; otherwise the steps above decide.
``hop-gate`` reads `bench/facts_hop_diagnose.py` train-split rows of the candidate and of the baseline on the same
seeds: it passes when the first hop asked alone is right in >= the baseline's count - 1 rows and the hop question
exactly in >= the baseline's count + 3 rows.

``missing`` lists the held-out cells (8 suites x 4 lengths per model) that no facts_gpu.py report holds yet: what
the spare call re-runs, one process per cell.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SELECT_SUITES = ("fact_word", "fact_name", "fact_phrase", "fact_date", "fact_number", "fact_multi_key", "niah")
SELECT_LENGTH = "65536"
RIVAL_SUITE, RIVAL_LENGTH = "fact_name", "8192"
MIN_CELLS = 4
EXACT_MARGIN, VETO_LEAD = 0.01, 0.05  # of the rows compared
RIVAL_TIE, VETO_RATIO, VETO_ABS = 0.01, 2.0, 0.02
GATE_LEAD = 0.02  # of the rows compared: how far behind arm A may be and still be picked for a passed hop gate
GATE_FIRST_SLACK, GATE_EXACT_GAIN = 1, 3  # rows of the hop gate
EVAL_SUITES = ("fact_word", "fact_name", "fact_phrase", "fact_date", "fact_number", "fact_multi_key", "fact_hop",
               "niah")
EVAL_LENGTHS = ("8192", "16384", "32768", "65536")


def _cells(reports: list[dict], a: str, b: str) -> dict:
    """(suite, length) -> {model: summary} for the cells holding both arms; a cell in two reports must agree."""
    out: dict = {}
    for rep in reports:
        for suite, by_len in rep.get("cells", {}).items():
            for length, cell in by_len.items():
                models = cell.get("models", {})
                if a not in models or b not in models:
                    continue
                key = (suite, str(length))
                if key in out and out[key] != {m: models[m] for m in (a, b)}:
                    raise ValueError(f"selection cell {key} reported twice with different results")
                out[key] = {m: models[m] for m in (a, b)}
    return out


def pick(reports: list[dict], a: str, b: str, control: str = "B") -> dict:
    """The rule's pick between arm A (model name `a`) and arm B (`b`): {"pick": "A" | "B", "why", the figures}."""
    cells = _cells(reports, a, b)
    sel = {s: cells[(s, SELECT_LENGTH)] for s in SELECT_SUITES if (s, SELECT_LENGTH) in cells}
    out: dict = {"cells": sorted(sel), "rule": "bench/facts_s12/RULE.md"}
    rival = cells.get((RIVAL_SUITE, RIVAL_LENGTH))
    if rival is not None and all("rival_pull" in rival[m] for m in (a, b)):
        out["rival_pull"] = {"A": rival[a]["rival_pull"], "B": rival[b]["rival_pull"]}
    if len(sel) < MIN_CELLS:
        out.update(pick=control, why=f"{len(sel)} of {len(SELECT_SUITES)} selection cells finished (< {MIN_CELLS}): "
                   "the control arm")
        return out
    n = sum(round(c[a]["rows"]) for c in sel.values())
    if any(round(c[a]["rows"]) != round(c[b]["rows"]) for c in sel.values()):
        raise ValueError("the arms were scored on different numbers of rows")
    exact = {arm: sum(round(c[m]["exact"] * c[m]["rows"]) for c in sel.values()) for arm, m in (("A", a), ("B", b))}
    nll = sum(c[a]["nll"] - c[b]["nll"] for c in sel.values()) / len(sel)  # A - B, negative: A lower
    lead = exact["A"] - exact["B"]
    out.update(rows=n, exact=exact, nll_diff_a_minus_b=nll)
    pull = out.get("rival_pull")
    if abs(lead) > EXACT_MARGIN * n:
        prov, why = ("A" if lead > 0 else "B"), f"exact rows A-B {lead:+d} of {n} (> {EXACT_MARGIN:.0%})"
    elif pull is not None and abs(pull["A"] - pull["B"]) >= RIVAL_TIE:
        prov = "A" if pull["A"] < pull["B"] else "B"
        why = (f"exact tie ({lead:+d} of {n}); lower rival pull {pull[prov]:.4f} vs "
               f"{pull['B' if prov == 'A' else 'A']:.4f}")
    else:
        prov = "A" if nll < 0 else "B"
        why = f"exact tie ({lead:+d} of {n}), rival pull tie or missing; mean NLL diff A-B {nll:+.4f}"
    other = "B" if prov == "A" else "A"
    if (pull is not None and pull[prov] >= VETO_RATIO * pull[other] and pull[prov] - pull[other] >= VETO_ABS
            and abs(lead) < VETO_LEAD * n):
        out.update(pick=other, vetoed=prov, why=f"{why}; VETO: {prov}'s rival pull {pull[prov]:.4f} >= "
                   f"{VETO_RATIO:g}x and +{VETO_ABS} over {other}'s {pull[other]:.4f}, exact lead < {VETO_LEAD:.0%}")
    else:
        out.update(pick=prov, why=why)
    return out


def hop_gate(rows: list[dict], cand: str, base: str) -> dict:
    """Session 14's hop gate from facts_hop_diagnose.py rows (train split): counts per model, and "passed"."""
    by = {m: {r["seed"]: r for r in rows if r.get("split") == "train" and r["model"] == m} for m in (cand, base)}
    if not by[cand] or set(by[cand]) != set(by[base]):
        raise ValueError(f"the gate needs both models on the same train rows: {sorted(by[cand])} vs {sorted(by[base])}")
    count = {m: {"rows": len(rs), "exact": sum(bool(r["correct"]) for r in rs.values()),
                 "first_hop": sum(bool(r["first_hop"]["correct"]) for r in rs.values())} for m, rs in by.items()}
    c, b = count[cand], count[base]
    g1 = c["first_hop"] >= b["first_hop"] - GATE_FIRST_SLACK
    g2 = c["exact"] >= b["exact"] + GATE_EXACT_GAIN
    return {"candidate": cand, "baseline": base, "counts": count, "g1_first_hop": g1, "g2_exact": g2,
            "passed": g1 and g2, "rule": "bench/facts_s14/RULE.md"}


def pick_with_gate(reports: list[dict], a: str, b: str, gate: dict) -> dict:
    """Session 14: arm A (the hop arm) when its hop gate passed and it is at most GATE_LEAD behind on exact rows;
    otherwise session 12's pick."""
    out = pick(reports, a, b)
    out["hop_gate"] = gate.get("passed")
    if gate.get("passed") and "exact" in out and out["exact"]["A"] >= out["exact"]["B"] - GATE_LEAD * out["rows"]:
        out.update(pick="A", why=f"hop gate passed and exact rows A-B {out['exact']['A'] - out['exact']['B']:+d} of "
                   f"{out['rows']} (>= -{GATE_LEAD:.0%}); session 12's steps said {out['pick']}: {out['why']}",
                   rule="bench/facts_s14/RULE.md")
    return out


def missing(reports: list[dict], models: list[str], suites=EVAL_SUITES, lengths=EVAL_LENGTHS) -> list[tuple]:
    """(model, suite, length) held-out cells no report holds (bits per byte needs no cell of its own: every
    facts_gpu.py --eval-only process measures it before its first cell)."""
    have = set()
    for rep in reports:
        for model, by_suite in rep.get("suites", {}).items():
            for suite, by_len in by_suite.items():
                have |= {(model, suite, str(n)) for n in by_len}
    return [(m, s, n) for m in models for s in suites for n in lengths if (m, s, n) not in have]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pick")
    a.add_argument("reports", nargs="*", help="facts_select.py JSON outputs")
    a.add_argument("--a", required=True, help="arm A's model name as the reports write it")
    a.add_argument("--b", required=True)
    a.add_argument("--out")
    a.add_argument("--hop-gate", help="session 14: the JSON `hop-gate` wrote")
    a = sub.add_parser("hop-gate")
    a.add_argument("rows", nargs="+", help="facts_hop_diagnose.py --jsonl files")
    a.add_argument("--cand", required=True)
    a.add_argument("--base", required=True)
    a.add_argument("--out", required=True)
    a = sub.add_parser("missing")
    a.add_argument("reports", nargs="*", help="facts_gpu.py facts_eval.json files")
    a.add_argument("--models", nargs="+", required=True)
    args = p.parse_args(argv)
    if args.cmd == "hop-gate":
        rows = [json.loads(line) for f in args.rows for line in Path(f).read_text().splitlines() if line.strip()]
        res = hop_gate(rows, args.cand, args.base)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res))
        return 0
    reports = []
    for f in args.reports:
        try:
            reports.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as exc:  # a file cut mid-write by a time limit: its cells are lost
            print(f"skipped {f}: {exc}", file=sys.stderr)
    if args.cmd == "pick":
        res = (pick_with_gate(reports, args.a, args.b, json.loads(Path(args.hop_gate).read_text())) if args.hop_gate
               else pick(reports, args.a, args.b))
        print(json.dumps(res), file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(res["pick"])
    else:
        for row in missing(reports, args.models):
            print(*row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
