"""Retrofit benchmark: pretrain a small Llama (built from a config, byte tokens) briefly on offline text, convert it
to superlinear attention, retrofit Q1 by distillation, and measure held-out loss before and after.

Text: Python's own docs and docstrings (`superlinear_lab.data.corpus("train")` plus the docstrings of every stdlib
module on the machine); held out: `corpus("eval")` (pydoc topics never trained on). Nothing is downloaded.

    python bench/retrofit_gpu.py --out OUTDIR [--pretrain-seconds 150] [--retrofit-seconds 120] [--tiny]
    python bench/retrofit_gpu.py --out OUTDIR --resume-from PREVIOUS_OUT   # reuse the dense model and Q1 state

Writes OUTDIR/retrofit_gpu.json (losses, recovery, timings, versions) and the resumable files
(dense/config.json, dense/model.safetensors, retro/state.json, retro/trainable.safetensors, retro/optimizer.safetensors).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from superlinear_kernels import SpanConfig
from superlinear_lab.data import corpus
from superlinear_lab.hf import convert, dense
from superlinear_lab.hf.distill import RetrofitSettings, heldout_loss, retrofit, token_windows
from superlinear_lab.model.tokenizer import ByteTokenizer


def stdlib_docstrings(min_chars: int = 80) -> str:
    """Docstrings (module, class, function) of the standard library's .py files, by path order; tests skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages", "dist-packages") for p in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    out.append(doc.strip())
    return "\n\n".join(out)


def build_model(tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048, tie_word_embeddings=True)
    else:
        cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=256, intermediate_size=512,
                          num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def pretrain(model, ids, seconds: float, batch: int, seq_len: int, lr: float, device) -> dict:
    """Dense next-token training for a wall-clock budget; lr warms up then follows a cosine in elapsed time."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    use_amp = device.type == "cuda"
    began = time.perf_counter()
    step, losses = 0, []
    while True:
        elapsed = time.perf_counter() - began
        if elapsed > seconds:
            break
        frac = elapsed / seconds
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        gen = torch.Generator().manual_seed(10_000_019 + step)
        rows = token_windows(ids, batch, seq_len + 1, gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=rows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            losses.append({"step": step, "loss": float(loss), "seconds": round(time.perf_counter() - began, 1)})
            print(f"pretrain step {step} loss {float(loss):.4f} ({time.perf_counter() - began:.0f} s)", flush=True)
    model.eval()
    return {"steps": step, "seconds": time.perf_counter() - began, "tokens": step * batch * seq_len,
            "final_train_loss": float(loss), "curve": losses}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--resume-from", default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke-test sizes")
    p.add_argument("--pretrain-seconds", type=float, default=150)
    p.add_argument("--retrofit-seconds", type=float, default=120)
    p.add_argument("--retrofit-steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--retro-batch", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--span", default='{"sw_index": 3, "num_spans": 2}')
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = ByteTokenizer()
    t0 = time.perf_counter()
    train_text = corpus("train").decode("utf-8") + "\n\n" + stdlib_docstrings()
    train_ids = torch.tensor(tok.encode(train_text), dtype=torch.int64)
    eval_ids = torch.tensor(tok.encode(corpus("eval").decode("utf-8")), dtype=torch.int64)
    print(f"text: {train_ids.numel()} train tokens, {eval_ids.numel()} held-out tokens "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    import transformers

    model = build_model(args.tiny)
    result = {"machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "python": platform.python_version()},
              "model": {"arch": "LlamaForCausalLM", "params": sum(p.numel() for p in model.parameters()),
                        **{k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "num_key_value_heads")}},
              "text": {"train_tokens": train_ids.numel(), "heldout_tokens": eval_ids.numel(),
                       "train": "pydoc topics (train split) + stdlib docstrings", "heldout": "pydoc topics (eval)"}}
    try:
        import triton

        result["machine"]["triton"] = triton.__version__
    except ImportError:
        pass
    if args.resume_from:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(args.resume_from) / "dense" / "model.safetensors")), strict=False)
        model.tie_weights()
        model.to(device).eval()
        result["pretrain"] = json.loads((Path(args.resume_from) / "retrofit_gpu.json").read_text())["pretrain"]
        retro_state = Path(args.resume_from) / "retro"
        if retro_state.exists():
            shutil.copytree(retro_state, out / "retro_run", dirs_exist_ok=True)
    else:
        model.to(device)
        result["pretrain"] = pretrain(model, train_ids, args.pretrain_seconds, args.batch, args.seq_len, 2e-3, device)
        (out / "dense").mkdir(exist_ok=True)
        model.save_pretrained(str(out / "dense"))
        for extra in (out / "dense").iterdir():
            if extra.name not in ("config.json", "model.safetensors"):
                extra.unlink()
    print(f"pretrained: {result['pretrain']['steps']} steps", flush=True)

    span = SpanConfig.default().replace(**json.loads(args.span))
    seq = args.seq_len
    t = time.perf_counter()
    loss_dense = heldout_loss(model, eval_ids, seq, max_windows=args.eval_windows)
    convert(model, span, search_query="proj")
    with dense(model):  # the teacher is the dense model: the same numbers as before converting
        loss_dense_check = heldout_loss(model, eval_ids, seq, max_windows=args.eval_windows)
    loss_before = heldout_loss(model, eval_ids, seq, max_windows=args.eval_windows)
    result["eval_seconds_first"] = time.perf_counter() - t
    print(f"held-out loss: dense {loss_dense:.4f} (dense() {loss_dense_check:.4f}), superlinear before "
          f"{loss_before:.4f}", flush=True)

    settings = RetrofitSettings(steps=args.retrofit_steps, batch_size=args.retro_batch, seq_len=seq, lr=3e-3,
                                loss="kl", save_every=50)
    t = time.perf_counter()
    res = retrofit(model, span, train_ids, out / "retro_run", settings=settings, progress=False,
                   time_limit=args.retrofit_seconds)
    retro_seconds = time.perf_counter() - t
    loss_after = heldout_loss(model, eval_ids, seq, max_windows=args.eval_windows)
    gap_before, gap_after = loss_before - loss_dense, loss_after - loss_dense
    result.update({
        "span_config": span.to_dict(), "window": span.window_len, "seq_len": seq,
        "eval_windows": min(args.eval_windows, (eval_ids.numel() - 1) // seq),
        "heldout_loss": {"dense": loss_dense, "dense_via_context": loss_dense_check,
                         "superlinear_training_free": loss_before, "superlinear_retrofit": loss_after},
        "recovered_fraction": (gap_before - gap_after) / gap_before if gap_before > 0 else None,
        "retrofit": {"steps_done": res.steps_done, "steps_planned": settings.steps, "resumed_from": res.resumed_from,
                     "seconds_this_call": retro_seconds,
                     "settings": vars(settings), "first": res.history[:3], "last": res.history[-3:],
                     "tokens": res.steps_done * settings.batch_size * seq,
                     "history_every_50": [h for h in res.history if h["step"] % 50 == 0]},
    })
    print(json.dumps(result["heldout_loss"], indent=1), "recovered", result["recovered_fraction"], flush=True)
    (out / "retro").mkdir(exist_ok=True)
    for name in ("state.json", "trainable.safetensors", "optimizer.safetensors"):
        src = out / "retro_run" / name
        if src.exists():
            shutil.copy(src, out / "retro" / name)
    shutil.rmtree(out / "retro_run", ignore_errors=True)
    if args.resume_from:
        result["resumed_from_dir"] = str(args.resume_from)
    (out / "retrofit_gpu.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
