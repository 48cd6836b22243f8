"""GPU check (not a test): whole-model gradients with the Triton backend vs the dense oracle.

Same weights, same batch, one forward + backward of the training loss; reports per-parameter relative
gradient error (‖g_triton − g_oracle‖ / ‖g_oracle‖), the loss difference and how many routing slots differ,
in fp32 and under bf16 autocast, for a fresh random init and for the shipped weights.

    python bench/model_grad_check.py [--lengths 1024 4096]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from superlinear_lab.model import HybridLM, ModelConfig, load_model
from superlinear_lab.train import TrainConfig, make_batch, step_loss


def run(model_fn, cfg: TrainConfig, length: int, batch: int, autocast: bool, device: str = "cuda",
        other: str = "triton") -> dict:
    stage_cfg = TrainConfig(**{**cfg.__dict__, "stages": [[length, 1, batch]]})
    examples = make_batch(stage_cfg, 0)
    grads, losses, routes = {}, {}, {}
    for backend in ("oracle", other):
        model = model_fn().set_backend(backend).to(device).train()
        loss, _ = step_loss(model, cfg, examples, device, autocast)
        loss.backward()
        losses[backend] = float(loss)
        grads[backend] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad(), model.trace() as tr:
            model(torch.tensor([examples[0].ids[:length]], device=device))
        routes[backend] = [tr.layer(i).qanchor.clone() for i in tr.layers]
    rel = {n: float((grads["oracle"][n] - grads[other][n]).norm() / grads["oracle"][n].norm().clamp_min(1e-20))
           for n in grads["oracle"]}
    differ = sum(int((a != b).sum()) for a, b in zip(routes["oracle"], routes[other]))
    total = sum(a.numel() for a in routes["oracle"])
    worst = max(rel, key=rel.get)
    return {"length": length, "autocast_bf16": autocast, "loss_oracle": losses["oracle"],
            "loss_triton": losses[other], "max_grad_rel": rel[worst], "worst_param": worst,
            "median_grad_rel": sorted(rel.values())[len(rel) // 2], "routing_slots_differ": differ,
            "routing_slots": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--other", default="triton", help="backend compared with the oracle")
    args = parser.parse_args()
    cfg = TrainConfig()
    models = {"random-init": lambda: HybridLM(ModelConfig.from_dict(cfg.model)),
              "shipped": lambda: load_model()}
    rows = []
    print(f"{'weights':>12} {'L':>6} {'bf16':>5} {'loss oracle':>12} {'loss triton':>12} {'max rel':>9} "
          f"{'median':>9} {'routing differ':>15}  worst parameter")
    for name, fn in models.items():
        for length in args.lengths:
            for autocast in ((False, True) if args.device == "cuda" else (False,)):
                row = {"weights": name, **run(fn, cfg, length, args.batch, autocast, args.device, args.other)}
                rows.append(row)
                print(f"{name:>12} {length:>6} {str(autocast):>5} {row['loss_oracle']:>12.5f} {row['loss_triton']:>12.5f} "
                      f"{row['max_grad_rel']:>9.2e} {row['median_grad_rel']:>9.2e} "
                      f"{row['routing_slots_differ']:>7}/{row['routing_slots']:<7}  {row['worst_param']}", flush=True)
    out = Path(os.environ.get("OUT", Path(__file__).resolve().parent)) / "model_grad_check.json"
    out.write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "other": args.other, "rows": rows},
                              indent=2))


if __name__ == "__main__":
    main()
