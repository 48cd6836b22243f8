"""Whole-model gradients of the tiny model under each backend and precision, against the fp32 oracle.

Same weights, same batch, one forward + backward of the training loss (`train.step_loss`). The reference is the
**oracle backend in fp32**. Each run is compared with it per parameter tensor: relative error
‖g − g_ref‖ / ‖g_ref‖ (Frobenius norms over the whole tensor), reported as the max and median over the model's
parameter tensors, with the loss, and how much of the routing differs: `topk_sets_differ` = the fraction of
(row, query head, query) whose set of chosen anchors (top-K of the search) differs from the reference's, over every
attention layer of the training forward (`sets_differ_per_layer`: the same per layer, in call order).

Runs (`--runs` picks some; names are backend-precision[-variant]):
* `triton-fp32`, `oracle-bf16`, `torch-bf16`, `triton-bf16`: bf16 = autocast over the whole model, with the model's
  fp32 regions (superlinear_lab/model/precision.py: attention call, Mamba scan and dt, output head, routing loss);
* `…-bf16-no-fp32-regions`: the same with those regions under autocast too (the model before session 5);
* diagnostics on the oracle backend, to separate the causes of the gap:
  `oracle-bf16-forced-routing` — bf16 autocast, but every layer attends with the reference run's anchors (gate
  values still computed from this run's q1/k), so no routing slot differs;
  `oracle-fp32-bf16-weights` — fp32 compute with the weights that autocast casts (`round_autocast_weights`)
  rounded to bf16 first,
  and `…-forced-routing` — the same with the reference's anchors: the part of the gap that the bf16 weight cast
  alone makes, whatever is computed in fp32.
Pairs of bf16 runs are compared too (`pairs`): Triton vs oracle both in bf16, torch vs oracle both in bf16.

`--train-steps N` also trains the tiny model from one random init with each backend (`train.train`, same seed,
batches and steps; bf16 autocast, or fp32 for a run named `backend-fp32`) and reports the loss curves and, for every
pair of curves, the largest and the mean |loss difference| over the steps.

    python bench/model_grad_check.py [--lengths 1024 4096] [--train-steps 150]
On CPU (`--device cpu`) bf16 runs use CPU autocast and the Triton backend is skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from superlinear_kernels import SearchResult
from superlinear_lab.model import HybridLM, ModelConfig, load_model
from superlinear_lab.model import precision
from superlinear_lab.train import TrainConfig, make_batch, step_loss, train

REFERENCE = "oracle-fp32"
RUNS = ["triton-fp32", "oracle-bf16", "torch-bf16", "triton-bf16", "oracle-bf16-no-fp32-regions",
        "torch-bf16-no-fp32-regions", "triton-bf16-no-fp32-regions", "oracle-bf16-forced-routing",
        "oracle-fp32-bf16-weights", "oracle-fp32-bf16-weights-forced-routing"]
PAIRS = [("oracle-bf16", "triton-bf16"), ("oracle-bf16", "torch-bf16")]


def forced(reference: SearchResult):
    """A routing override (`SuperlinearAttentionLayer.routing_overrides`) that attends with `reference`'s anchors and
    spans; the gate values are this run's own scores <q1, k(anchor)> (fp32), so gradients still reach q1 and k."""
    def override(positions, routing, q1, k):
        anchor = reference.qanchor.long()  # [B, H_Q, L, K]
        b, h, length, slots = anchor.shape
        keys = k.repeat_interleave(h // k.shape[1], dim=1)  # [B, H_Q, L_KV, D]
        index = anchor.clamp_min(0).reshape(b, h, length * slots, 1).expand(-1, -1, -1, keys.shape[-1])
        at = torch.gather(keys, 2, index).reshape(b, h, length, slots, -1)
        values = (q1.float()[..., None, :] * at.float()).sum(-1)
        values = torch.where(anchor >= 0, values, torch.full_like(values, float("-inf")))
        return SearchResult(reference.qstart, reference.qanchor, reference.qend, values)
    return override


@torch.no_grad()
def round_autocast_weights(model: HybridLM) -> None:
    """Round to bf16 (in place) the weights that bf16 autocast casts in this model: every linear weight except
    what the model computes in fp32 regions (precision.py): the output head (tied or not) and the dt rows of each
    Mamba-2 in_proj (the short conv is in fp32 too)."""
    heads = model.cfg.ssm_heads
    for name, p in model.named_parameters():
        if p.dim() < 2 or name in ("embed.weight", "lm_head.weight") or name.endswith("conv.weight"):
            continue
        rows = p[:-heads] if name.endswith("in_proj.weight") else p
        rows.copy_(rows.to(torch.bfloat16).float())


def gradients(model_fn, cfg: TrainConfig, examples, device: str, run: str, reference=None):
    """(loss, {name: fp32 grad}, [routing per attention layer]) of one forward + backward of `run`."""
    backend, dtype, *variant = run.split("-", 2)
    variant = variant[0] if variant else ""
    bf16 = dtype == "bf16"
    model = model_fn().set_backend(backend).to(device).train()
    if "bf16-weights" in variant:
        round_autocast_weights(model)
    routing = []
    for j, (_, layer) in enumerate(model.routing_layers()):
        if "forced-routing" in variant:
            layer.routing_overrides.append(forced(reference[2][j]))
        layer.routing_recorders.append(lambda positions, r, q1, k: routing.append(r))
    precision.FP32_REGIONS = "no-fp32-regions" not in variant
    # step_loss enters CUDA autocast itself; on CPU the outer context does it.
    outer = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and device == "cpu" else contextlib.nullcontext()
    try:
        with outer:
            loss, _ = step_loss(model, cfg, examples, device, bf16 and device != "cpu")
        loss.backward()
    finally:
        precision.FP32_REGIONS = True
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, routing


def step_seconds(cfg: TrainConfig, examples, device: str, backend: str, regions: bool, reps: int) -> float:
    """Median wall seconds of one training forward + backward (`step_loss`, bf16 autocast) of the random-init
    model, with or without the fp32 regions (what they cost)."""
    model = HybridLM(ModelConfig.from_dict(cfg.model)).set_backend(backend).to(device).train()
    outer = torch.autocast("cpu", dtype=torch.bfloat16) if device == "cpu" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    precision.FP32_REGIONS = regions
    times = []
    try:
        for _ in range(reps + 2):  # two warm-up steps (compilation, allocator)
            model.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            with outer:
                loss, _ = step_loss(model, cfg, examples, device, device != "cpu")
            loss.backward()
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        precision.FP32_REGIONS = True
    times = sorted(times[2:])
    return times[len(times) // 2]


def sets_differ_per_layer(ref: list, got: list) -> list[tuple[int, int]]:
    """Per attention layer (in call order): (how many (row, query head, query) have a different set of anchors in
    the two routings, how many there are)."""
    counts = []
    for a, b in zip(ref, got):
        sa, sb = a.qanchor.sort(-1).values, b.qanchor.sort(-1).values
        counts.append((int((sa != sb).any(-1).sum()), sa[..., 0].numel()))
    return counts


def topk_sets_differ(ref: list, got: list) -> float:
    """Fraction of (row, query head, query) over all layers whose set of anchors differs between two routings."""
    counts = sets_differ_per_layer(ref, got)
    return sum(c for c, _ in counts) / max(sum(n for _, n in counts), 1)


def compare(ref, got) -> dict:
    (l_ref, g_ref, r_ref), (l_got, g_got, r_got) = ref, got
    rel = {n: float((g_ref[n] - g_got[n]).norm() / g_ref[n].norm().clamp_min(1e-20)) for n in g_ref}
    worst = max(rel, key=rel.get)
    ordered = sorted(rel.values())
    return {"loss_ref": l_ref, "loss": l_got, "max_grad_rel": rel[worst], "worst_param": worst,
            "median_grad_rel": ordered[len(ordered) // 2], "topk_sets_differ": topk_sets_differ(r_ref, r_got),
            "sets_differ_per_layer": [c / max(n, 1) for c, n in sets_differ_per_layer(r_ref, r_got)],
            "per_param": rel}


@contextlib.contextmanager
def fp32_training():
    """`train.train` without autocast and without TF32 (it turns TF32 on for CUDA) inside: an fp32 loss curve."""
    from superlinear_lab import train as train_module

    step_loss_bf16 = train_module.step_loss
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def step_loss_fp32(model, cfg, examples, device, autocast):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        return step_loss_bf16(model, cfg, examples, device, False)

    train_module.step_loss = step_loss_fp32
    try:
        yield
    finally:
        train_module.step_loss = step_loss_bf16
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def curve_gaps(a: list, b: list) -> dict:
    """The largest and the mean |a_i − b_i| over the steps both curves have."""
    diffs = [abs(x - y) for x, y in zip(a, b)]
    return {"max": max(diffs), "mean": sum(diffs) / len(diffs), "steps": len(diffs)}


def loss_curves(cfg: TrainConfig, device: str, runs, steps: int, length: int, batch: int, done=None) -> dict:
    """Train from the same random init with each run (a backend name, optionally with "-no-fp32-regions" or "-fp32";
    bf16 autocast on CUDA unless "-fp32", `train.train`, same batches); the loss per step, per run against the first
    the largest and the mean |loss − first's| over the steps, the same for every pair of runs (`gaps`, "a vs b"),
    and the mean loss of the last 20 steps. `done(result)` is called with the result so far after each run."""
    run_cfg = TrainConfig(**{**cfg.__dict__, "stages": [[length, steps, batch]], "probe_every": 0, "warmup": 20})
    curves, seconds, gaps = {}, {}, {}
    result = {"length": length, "batch": batch, "steps": steps, "curves": curves, "seconds": seconds, "gaps": gaps,
              "precision": {r: "fp32 (no autocast, no TF32)" if r.endswith("-fp32") else
                            "bf16 autocast" + (" without fp32 regions" if "no-fp32-regions" in r else "")
                            for r in runs}}
    for run in runs:
        backend = run.split("-", 1)[0]
        precision.FP32_REGIONS = "no-fp32-regions" not in run
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp, \
                    (fp32_training() if run.endswith("-fp32") else contextlib.nullcontext()):
                torch.manual_seed(0)
                train(run_cfg, tmp, device=device, backend=backend, save_every=10**9, progress=False)
                log = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
        except Exception as e:  # noqa: BLE001 - a failing backend is reported, the other curves still run
            result.setdefault("errors", {})[run] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"loss curve {run} FAILED: {result['errors'][run]}", flush=True)
            continue
        finally:
            precision.FP32_REGIONS = True
        seconds[run] = time.perf_counter() - t0
        curves[run] = [e["loss"] for e in log]
        print(f"loss curve {run}: {steps} steps in {seconds[run]:.1f} s, last 20 mean "
              f"{sum(curves[run][-20:]) / len(curves[run][-20:]):.4f}", flush=True)
        for other in curves:
            if other != run:
                gaps[f"{run} vs {other}"] = curve_gaps(curves[run], curves[other])
        base = curves.get(runs[0], [])
        result[f"max_abs_gap_vs_{runs[0]}"] = {b: curve_gaps(base, c)["max"]
                                               for b, c in curves.items() if b != runs[0] and base}
        result[f"mean_abs_gap_vs_{runs[0]}"] = {b: curve_gaps(base, c)["mean"]
                                                for b, c in curves.items() if b != runs[0] and base}
        result["mean_loss_last_20"] = {b: sum(c[-20:]) / len(c[-20:]) for b, c in curves.items()}
        if done is not None:
            done(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096], help="gradient rows (none: skip)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batch-steps", type=int, nargs="+", default=[0],
                        help="which training batches (make_batch's step index) to check; one row set per batch")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", nargs="+", default=["random-init", "shipped"])
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    parser.add_argument("--train-steps", type=int, default=0, help="also compare loss curves over this many steps")
    parser.add_argument("--train-length", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-runs", nargs="+", default=["oracle", "triton", "torch"],
                        help="loss-curve runs: backends, the first is the reference; suffix '-no-fp32-regions' "
                        "(bf16 autocast without the fp32 regions) or '-fp32' (no autocast, no TF32) allowed")
    parser.add_argument("--timing", type=int, nargs="*", default=[],
                        help="also time training steps at these lengths (batch = 16K tokens / L), regions on/off")
    parser.add_argument("--timing-reps", type=int, default=10)
    parser.add_argument("--timing-backends", nargs="+", default=["triton", "oracle"])
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT or bench/ /model_grad_check.json)")
    args = parser.parse_args()
    cfg = TrainConfig()
    cuda = args.device == "cuda"
    runs = [r for r in args.runs if cuda or not r.startswith("triton")]
    pairs = [p for p in PAIRS if p[0] in runs and p[1] in runs]
    models = {"random-init": lambda: HybridLM(ModelConfig.from_dict(cfg.model)), "shipped": lambda: load_model()}
    rows = []
    out = Path(args.out) if args.out else \
        Path(os.environ.get("OUT", Path(__file__).resolve().parent)) / "model_grad_check.json"
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else args.device,
              "reference": REFERENCE, "batch": args.batch,
              "metric": "per parameter tensor ||g - g_ref|| / ||g_ref|| (Frobenius), max and median over tensors",
              "rows": rows}
    print(f"{'weights':>11} {'L/batch':>7} {'run':>40} {'vs':>11} {'loss':>9} {'ref loss':>9} {'max rel':>8} "
          f"{'median':>8} {'sets differ':>11}  worst parameter")
    for wname in args.weights:
        fn = models[wname]
        for length, batch_step in [(n, b) for n in args.lengths for b in args.batch_steps]:
            examples = make_batch(TrainConfig(**{**cfg.__dict__, "stages": [[length, 1, args.batch]]}), batch_step)
            results, failed = {REFERENCE: gradients(fn, cfg, examples, args.device, REFERENCE)}, {}
            for ref, run in [(REFERENCE, r) for r in runs] + pairs:
                if ref not in results or run in failed:
                    continue
                if run not in results:
                    t0 = time.perf_counter()
                    try:
                        results[run] = gradients(fn, cfg, examples, args.device, run, results[REFERENCE])
                    except Exception as e:  # noqa: BLE001 - a backend that fails is a row, not the end of the check
                        failed[run] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                        rows.append({"weights": wname, "length": length, "batch_step": batch_step, "run": run,
                                     "reference": ref, "error": failed[run]})
                        print(f"{wname:>11} {length:>5}/{batch_step} {run:>40} FAILED: {failed[run]}", flush=True)
                        continue
                    seconds = time.perf_counter() - t0
                row = {"weights": wname, "length": length, "batch_step": batch_step, "run": run, "reference": ref,
                       **({"seconds": seconds} if ref == REFERENCE else {}), **compare(results[ref], results[run])}
                rows.append(row)
                print(f"{wname:>11} {length:>5}/{batch_step} {run:>40} {ref:>11} {row['loss']:>9.5f} {row['loss_ref']:>9.5f} "
                      f"{row['max_grad_rel']:>8.2%} {row['median_grad_rel']:>8.2%} "
                      f"{row['topk_sets_differ']:>11.2%}  {row['worst_param']}  per layer "
                      + " ".join(f"{x:.2%}" for x in row["sets_differ_per_layer"]), flush=True)
            out.write_text(json.dumps(report, indent=1))
            del results
    report["timing"] = timing = []
    for length in args.timing:
        batch = max(1, 16384 // length)
        examples = make_batch(TrainConfig(**{**cfg.__dict__, "stages": [[length, 1, batch]]}), 0)
        for backend in (args.timing_backends if cuda else ["torch"]):
            row = {"length": length, "batch": batch, "backend": backend, "reps": args.timing_reps}
            for regions in (False, True, False, True):  # interleaved: drift shows up as a difference between repeats
                key = "with_fp32_regions_s" if regions else "without_s"
                row.setdefault(key, []).append(step_seconds(cfg, examples, args.device, backend, regions,
                                                            args.timing_reps))
            timing.append(row)
            print(f"train step L={length} x {batch} {backend}: bf16 fwd+bwd median s without fp32 regions "
                  f"{row['without_s']}, with {row['with_fp32_regions_s']}", flush=True)
            out.write_text(json.dumps(report, indent=1))
    if args.train_steps:
        runs = [r for r in args.train_runs if cuda or not r.startswith("triton")]
        def save(result):
            report["loss_curves"] = result
            out.write_text(json.dumps(report, indent=1))
        curves = loss_curves(cfg, args.device, runs, args.train_steps, args.train_length, args.train_batch, save)
        print(f"loss curves, {args.train_steps} steps at L={args.train_length} x {args.train_batch}: "
              f"max |loss - {runs[0]}'s| {curves[f'max_abs_gap_vs_{runs[0]}']}, mean {curves[f'mean_abs_gap_vs_{runs[0]}']}, "
              f"mean of last 20 {curves['mean_loss_last_20']}", flush=True)
        for pair, gap in curves["gaps"].items():
            print(f"  {pair}: max |difference| {gap['max']:.4f}, mean {gap['mean']:.4f} over {gap['steps']} steps",
                  flush=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
