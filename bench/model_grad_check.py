"""Whole-model gradients of the tiny model under each backend and precision, against the fp32 oracle.

Same weights, same batch, one forward + backward of the training loss (`train.step_loss`). The reference is the
**oracle backend in fp32**. Each run — (backend, precision) — is compared with it per parameter:
relative error ‖g − g_ref‖ / ‖g_ref‖, reported as the max and median over parameters, with the loss and how many
routing slots differ. Under bf16 autocast the whole model (projections, SSM, norms) runs in bf16, so even the
oracle backend is far from the fp32 oracle; those rows are the floor a bf16 Triton run can be held to. Pairs of bf16
runs are compared too (`pairs`): Triton vs oracle both in bf16, and torch vs oracle both in bf16 (two backends that
compute attention in fp32 — their difference is what bf16 rounding elsewhere makes of fp32-level differences).

`--train-steps N` also trains the tiny model from one random init with each backend under bf16 autocast
(`train.train`, same batches), and reports the loss curves and their largest gap.

    python bench/model_grad_check.py [--lengths 1024 4096] [--train-steps 150]
On CPU (`--device cpu`) bf16 runs use CPU autocast and the Triton backend is skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from superlinear_lab.model import HybridLM, ModelConfig, load_model
from superlinear_lab.train import TrainConfig, make_batch, step_loss, train

REFERENCE = ("oracle", False)


def gradients(model_fn, cfg: TrainConfig, examples, device: str, backend: str, bf16: bool):
    """(loss, {name: fp32 grad}, [qanchor per layer]) of one forward + backward."""
    model = model_fn().set_backend(backend).to(device).train()
    # step_loss enters CUDA autocast itself; on CPU the outer context does it.
    outer = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and device == "cpu" else contextlib.nullcontext()
    with outer:
        loss, _ = step_loss(model, cfg, examples, device, bf16 and device != "cpu")
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad(), outer, torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device != "cpu"), \
            model.trace() as tr:
        model(torch.tensor([examples[0].ids], device=device))
    return loss.item(), grads, [tr.layer(i).qanchor.clone() for i in tr.layers]


def compare(ref, got) -> dict:
    (l_ref, g_ref, r_ref), (l_got, g_got, r_got) = ref, got
    rel = {n: float((g_ref[n] - g_got[n]).norm() / g_ref[n].norm().clamp_min(1e-20)) for n in g_ref}
    worst = max(rel, key=rel.get)
    ordered = sorted(rel.values())
    return {"loss_ref": l_ref, "loss": l_got, "max_grad_rel": rel[worst], "worst_param": worst,
            "median_grad_rel": ordered[len(ordered) // 2],
            "routing_slots_differ": sum(int((a != b).sum()) for a, b in zip(r_ref, r_got)),
            "routing_slots": sum(a.numel() for a in r_ref)}


def name(run) -> str:
    return f"{run[0]}-{'bf16' if run[1] else 'fp32'}"


def loss_curves(cfg: TrainConfig, device: str, backends, steps: int, length: int, batch: int) -> dict:
    """Train from the same random init with each backend (bf16 autocast on CUDA); loss per step."""
    run_cfg = TrainConfig(**{**cfg.__dict__, "stages": [[length, steps, batch]], "probe_every": 0, "warmup": 20})
    curves = {}
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            train(run_cfg, tmp, device=device, backend=backend, save_every=10**9, progress=False)
            log = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
        curves[backend] = [e["loss"] for e in log]
    base = curves[backends[0]]
    gaps = {b: max(abs(x - y) for x, y in zip(base, c)) for b, c in curves.items() if b != backends[0]}
    tail = {b: sum(c[-20:]) / len(c[-20:]) for b, c in curves.items()}
    return {"length": length, "batch": batch, "steps": steps, "curves": curves,
            f"max_abs_gap_vs_{backends[0]}": gaps, "mean_loss_last_20": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-steps", type=int, default=0, help="also compare loss curves over this many steps")
    parser.add_argument("--train-length", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=16)
    args = parser.parse_args()
    cfg = TrainConfig()
    cuda = args.device == "cuda"
    runs = [("triton", False)] if cuda else [("torch", False)]
    runs += [("oracle", True), ("torch", True)] + ([("triton", True)] if cuda else [])
    pairs = [(("oracle", True), ("triton", True)), (("oracle", True), ("torch", True))] if cuda else \
        [(("oracle", True), ("torch", True))]
    models = {"random-init": lambda: HybridLM(ModelConfig.from_dict(cfg.model)), "shipped": lambda: load_model()}
    rows = []
    print(f"{'weights':>11} {'L':>5} {'run':>12} {'vs':>12} {'loss':>9} {'max rel':>9} {'median':>9} "
          f"{'routing differ':>15}  worst parameter")
    for wname, fn in models.items():
        for length in args.lengths:
            examples = make_batch(TrainConfig(**{**cfg.__dict__, "stages": [[length, 1, args.batch]]}), 0)
            results = {r: gradients(fn, cfg, examples, args.device, *r) for r in [REFERENCE, *runs]}
            for ref, run in [(REFERENCE, r) for r in runs] + pairs:
                row = {"weights": wname, "length": length, "run": name(run), "reference": name(ref),
                       **compare(results[ref], results[run])}
                rows.append(row)
                print(f"{wname:>11} {length:>5} {row['run']:>12} {row['reference']:>12} {row['loss']:>9.5f} "
                      f"{row['max_grad_rel']:>9.2e} {row['median_grad_rel']:>9.2e} "
                      f"{row['routing_slots_differ']:>7}/{row['routing_slots']:<7}  {row['worst_param']}", flush=True)
            del results
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else args.device,
              "reference": name(REFERENCE), "batch": args.batch, "rows": rows}
    if args.train_steps:
        backends = ["oracle", "triton", "torch"] if cuda else ["oracle", "torch"]
        report["loss_curves"] = curves = loss_curves(cfg, args.device, backends, args.train_steps,
                                                     args.train_length, args.train_batch)
        print(f"loss curves, {args.train_steps} steps at L={args.train_length} x {args.train_batch}: "
              f"max |loss - oracle's| {curves['max_abs_gap_vs_oracle']}, mean of last 20 {curves['mean_loss_last_20']}",
              flush=True)
    out = Path(os.environ.get("OUT", Path(__file__).resolve().parent)) / "model_grad_check.json"
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
