"""Model selection on rows the evaluation never uses, long enough to tell arms apart (issue 13).

Session 10's lesson: two training arms that differed by 3 points on the held-out suites (mean over 7 fact suites at
8K-64K) scored the same on every train-split probe at 8K (95.8 % and 99 %: saturated), so the selection rule picked
the weaker arm. This probe scores train-split rows shaped like the held-out suites (``make_example(task, L, seed,
"train")``: train phrasings, train values, seeds from 900,000 on, far from any training step's rows) at the lengths
where the arms differ (16K-64K), and for every row it keeps the answer's mean negative log-likelihood as well as
exact match. Two or more models run on the same rows, so the comparison is paired: per suite and length the mean
NLL difference against the first model, how many rows each model wins, and the exact-match rows only one of them
gets (the discordant pairs a sign test counts). NLL moves long before exact match does.

``--rival-pull`` (session 11's lesson: the candidate lost held-out names by picking another name of its row, which
exact counts on train-split rows did not show against the other arm) adds per row the probability the model puts,
at the query that predicts the answer's first byte, on the first bytes of the row's rival values
(`Example.rivals`: the other same-kind values of its statements) that differ from the answer's own first byte; the
cell reports its mean over all rows (a row without rivals adds 0) next to the exact counts (`rival_pull`).

Answer bytes are the row's answer less its prompt ranges (`Example.prompts`); for the single-question suites this is
the whole answer, and exact match is the same as `superlinear_lab.evaluate`'s (greedy decoding reproduces the value
under teacher forcing). Never reads the eval split. Writes JSON and prints one line per suite and length::

    python bench/facts_select.py --models runs/facts_s10A_cont runs/facts_s10A_new --lengths 16384 32768 65536 \\
        --rows 128 --device cuda --out select.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from superlinear_lab import data as D
from superlinear_lab import facts
from superlinear_lab.loaders import open_model

log = logging.getLogger("facts_select")

SPLIT = "train"  # the only split this probe reads
SEED_BASE = 900_000  # train-split rows far from any training step's seeds
SUITES = ("fact_word", "fact_name", "fact_phrase", "fact_date", "fact_number", "fact_multi_key", "niah")


def answer_positions(ex: D.Example) -> list[int]:
    """Positions of the answer bytes that are scored: the answer range less its prompt ranges."""
    a0, a1 = ex.answer
    prompt = {p for b0, b1 in ex.prompts for p in range(b0, b1)}
    return [p for p in range(a0, a1) if p not in prompt]


def rival_pull(probs: torch.Tensor, ex: D.Example) -> tuple[float, int]:
    """(mass, n): the summed probability in `probs` of the n distinct first bytes of `ex`'s rival values that differ
    from the answer's first byte.

    probs: the next-byte distribution [V] at the query before the answer's first byte (position answer[0] - 1).
    A rival range that this query needs (evidence of the answer, as a `fact_quiz` value can be) is not a rival here;
    a rival whose first byte is the answer's cannot be told from the answer at this byte and is left out; rivals
    sharing a first byte count it once."""
    q = ex.answer[0] - 1
    first = ex.ids[ex.answer[0]]
    needed = {tuple(ex.evidence[i]) for i in ex.needs.get(q, [])}
    tokens = {ex.ids[a] for a, b in ex.rivals if b > a and (a, b) not in needed} - {first}
    return float(sum(probs[t].item() for t in tokens)), len(tokens)


@torch.no_grad()
def score_rows(model, rows: list[D.Example], tokens_per_batch: int = 65536, rival: bool = False) -> list[dict]:
    """Per row: ``nll`` (mean negative log-likelihood of its answer bytes, nats, teacher forcing), ``first_nll``
    (of the first one: where the fact is picked), ``exact`` (argmax right at every answer byte); with `rival`, also
    ``rival_pull`` and ``rival_bytes`` (`rival_pull`'s mass and count at the first answer byte's query).

    rows: examples of one length L; batched as [B, L] ids with B = max(1, tokens_per_batch // L)."""
    out = []
    length = rows[0].length
    batch = max(1, tokens_per_batch // length)
    for b0 in range(0, len(rows), batch):
        chunk = rows[b0:b0 + batch]
        ids = torch.tensor([ex.ids for ex in chunk], device=model.device)
        logits = model(ids)
        for b, ex in enumerate(chunk):
            pos = torch.tensor(answer_positions(ex), device=logits.device)
            logp = F.log_softmax(logits[b, pos - 1].float(), dim=-1)  # the query before each answer byte
            target = ids[b, pos]
            nll = -logp.gather(1, target[:, None])[:, 0]
            row = {"nll": nll.mean().item(), "first_nll": nll[0].item(),
                   "exact": bool((logp.argmax(-1) == target).all())}
            if rival:  # the query before the answer's first byte, whatever the scored positions are
                probs = F.softmax(logits[b, ex.answer[0] - 1].float(), dim=-1)
                row["rival_pull"], row["rival_bytes"] = rival_pull(probs, ex)
            out.append(row)
    return out


def paired(a: list[dict], b: list[dict]) -> dict:
    """Model b against model a on the same rows: mean NLL difference (b - a; negative = b better), rows each wins
    on NLL, and exact-match rows only one of them gets."""
    d = [y["nll"] - x["nll"] for x, y in zip(a, b)]
    return {"nll_diff": sum(d) / len(d), "b_lower_nll": sum(v < 0 for v in d), "a_lower_nll": sum(v > 0 for v in d),
            "only_b_exact": sum(y["exact"] and not x["exact"] for x, y in zip(a, b)),
            "only_a_exact": sum(x["exact"] and not y["exact"] for x, y in zip(a, b))}


def summary(scores: list[dict]) -> dict:
    n = len(scores)
    out = {"rows": n, "exact": sum(s["exact"] for s in scores) / n, "nll": sum(s["nll"] for s in scores) / n,
           "first_nll": sum(s["first_nll"] for s in scores) / n}
    if scores and "rival_pull" in scores[0]:
        out["rival_pull"] = sum(s["rival_pull"] for s in scores) / n  # over all rows: no rival adds 0
        out["rival_rows"] = sum(s["rival_bytes"] > 0 for s in scores)
    return out


def run(models: dict, suites, lengths, rows: int, tokens_per_batch: int = 65536, rival: bool = False,
        on_cell=None) -> dict:
    """models: {name: model}. Returns {"cells": {suite: {L: {"models": {name: summary}, "paired": {name: paired vs
    the first model}}}}, "overall": {name: summed paired counts and the mean NLL difference over all cells}}.
    `rival`: score_rows' rival pull too. `on_cell(cells)` is called after each cell (e.g. to write what is done
    so far: a process stopped by a time limit keeps its finished cells)."""
    names = list(models)
    cells: dict = {}
    overall = {n: {"cells": 0, "nll_diff": 0.0, "b_lower_nll": 0, "a_lower_nll": 0, "only_b_exact": 0,
                   "only_a_exact": 0} for n in names[1:]}
    for suite in suites:
        for length in lengths:
            t0 = time.time()
            exs = [D.make_example(suite, length, SEED_BASE + s, SPLIT) for s in range(rows)]
            per = {n: score_rows(m, exs, tokens_per_batch, rival) for n, m in models.items()}
            cell = {"models": {n: summary(s) for n, s in per.items()}, "paired": {}}
            for n in names[1:]:
                p = paired(per[names[0]], per[n])
                cell["paired"][n] = p
                o = overall[n]
                o["cells"] += 1
                o["nll_diff"] += p["nll_diff"]
                for k in ("b_lower_nll", "a_lower_nll", "only_b_exact", "only_a_exact"):
                    o[k] += p[k]
            cell["seconds"] = round(time.time() - t0, 1)
            cells.setdefault(suite, {})[str(length)] = cell
            print(suite, length, json.dumps({n: {k: round(v, 4) for k, v in s.items()}
                                             for n, s in cell["models"].items()}),
                  json.dumps(cell["paired"]), flush=True)
            if on_cell is not None:
                on_cell(cells)
    for o in overall.values():
        o["nll_diff"] = o["nll_diff"] / max(o["cells"], 1)
    return {"cells": cells, "overall": overall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="shipped names or model folders; the first is the "
                   "reference of the paired comparisons")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--rows", type=int, default=128, help="train-split rows per suite and length")
    p.add_argument("--suites", nargs="+", default=list(SUITES), choices=sorted(D.TASKS + facts.TASKS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--corpus", default="runs/corpus", help="filler text folder (superlinear_lab.corpus)")
    p.add_argument("--tokens-per-batch", type=int, default=65536)
    p.add_argument("--rival-pull", action="store_true", help="also the probability on rival values' first bytes "
                   "at the answer's first byte (per row; mean per cell and model)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error(f"--rows must be at least 1, got {args.rows}")
    if len(set(args.models)) != len(args.models):
        p.error(f"--models must name each model once, got {args.models}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if Path(args.corpus).is_dir():
        D.use_corpus(args.corpus)
    else:
        log.warning("no corpus folder %s: the default corpus (Python's docs) is used", args.corpus)
    models = {m: open_model(m, device=args.device, backend=args.backend).eval()
              for m in tqdm(args.models, desc="models", unit="model")}
    report = {"split": SPLIT, "seed_base": SEED_BASE, "rows": args.rows, "lengths": args.lengths,
              "suites": args.suites, "models": args.models, "backend": args.backend, "device": args.device,
              "corpus": D.corpus_fingerprint()[SPLIT], "torch": torch.__version__, "rival_pull": args.rival_pull}

    def partial(cells):  # the cells done so far, rewritten after each one; the full report replaces it at the end
        Path(args.out).write_text(json.dumps({**report, "cells": cells, "partial": True}, indent=1) + "\n")

    report.update(run(models, args.suites, args.lengths, args.rows, args.tokens_per_batch, args.rival_pull, partial))
    for n, o in report["overall"].items():
        print(f"overall {n} vs {args.models[0]}: mean NLL diff {o['nll_diff']:+.4f} over {o['cells']} cells; "
              f"rows with lower NLL {o['b_lower_nll']} vs {o['a_lower_nll']}; exact only {o['only_b_exact']} vs "
              f"{o['only_a_exact']}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    return 0 if all(math.isfinite(c["models"][m]["nll"]) for s in report["cells"].values()
                    for c in s.values() for m in c["models"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
