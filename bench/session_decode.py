"""Decode speed as a user gets it (issue 16): tokens/s of a real `Session` and the one-token attention call.

Part 1, the attention layer (release preset: B = 1, H_Q = 32, H_KV = 2, D = 128, bf16, random K/V in a static
cache of capacity L, the query at L - 1). Per call, back to back (a decoding loop; CUDA events around
`--reps` calls, median of 5 loops):
  * ``public``: `superlinear_attention(..., backend="triton")` (one query: the no-sync single-query path, which
    replays its own graph from the second call on; docs/algorithm.md §6.1);
  * ``entry``: the pre-validated `DecodeAttention` called eagerly with an int position, as shipped (on CUDA it
    replays its own CUDA graph); ``entry_no_graph``: the same with ``graph=False`` (kernels launched from Python);
  * ``graph``: a caller's CUDA graph of the (graph=False) entry call, replayed (position in a device tensor);
  * ``dense``: a CUDA graph of non-causal SDPA over the whole cache.
  The entry's and the graph's outputs are compared with the public call's, bit for bit.

Part 2, the shipped tiny model (or, with ``--model exp-tiny``, a random `SuperlinearExpLM` of
`SuperlinearExpConfig.tiny()`: Mamba-2, MoE and attention blocks) in a `Session` on the GPU (default dtype fp32,
Triton attention). One session is
prefilled with real text (the repo's own docs and sources, repeated) to each context length in turn (`grow` in
between), and at each length `generate(n)` (greedy) is timed in the three decode modes: "auto" (the whole-model
CUDA graph; `generate` is pipelined, `stream` — timed as "auto_stream" — goes one token at a time), "eager" (the
same one-token step without the whole-model graph) and "forward" (the previous path: the model's `forward` at the
cursor, one token at a time). Each mode starts from the same checkpoint; tokens and final logits are compared
between the modes. tokens/s = generated tokens / wall seconds of `generate` (sampling and bookkeeping included).

    python bench/session_decode.py --out bench/session_decode_h200.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
# bench/speed.py: timing, capture, profiler summary, random inputs
from speed import H_Q, graphed, kernel_rows, make_inputs, timed  # noqa: E402


def loop_ms(fn, reps: int, loops: int = 5) -> float:
    """Median over `loops` of (device time of `reps` back-to-back calls) / reps, in ms."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(loops):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def release_decode_inputs(length: int) -> tuple:
    """Random bf16 inputs of one release-layer decode step at the last of `length` positions (speed.make_inputs,
    seed 0): (k, v [1, H_KV, L, D], q1, q2 [1, H_Q, 1, D], pos: int, pos_dev: [1] int64 CUDA tensor)."""
    q1, q2, k, v = make_inputs(length, torch.bfloat16, coherent=False, q_len=1)
    return k, v, q1, q2, length - 1, torch.tensor([length - 1], device="cuda")


def attention_row(length: int, reps: int) -> dict:
    from superlinear_kernels import DecodeAttention, SpanConfig, superlinear_attention

    cfg = SpanConfig.release()
    k, v, q1, q2, pos, pos_dev = release_decode_inputs(length)
    entry = DecodeAttention(k, v, cfg, num_heads=H_Q, backend="triton")  # the default: replays its own graph
    direct = DecodeAttention(k, v, cfg, num_heads=H_Q, backend="triton", graph=False)
    with torch.no_grad():
        ref = superlinear_attention(q1, q2, k, v, pos_dev, cfg, backend="triton")
        got_entry = entry(q1, q2, pos)
        got_direct = direct(q1, q2, pos)
        graph, out = graphed(lambda: direct(q1, q2, pos_dev))
        graph.replay()
        torch.cuda.synchronize()
        dense_graph, _ = graphed(lambda: torch.nn.functional.scaled_dot_product_attention(
            q2, k, v, enable_gqa=True))
        row = {
            "L": length,
            "entry_equals_public": bool(torch.equal(ref, got_entry)),
            "entry_no_graph_equals_public": bool(torch.equal(ref, got_direct)),
            "graph_equals_public": bool(torch.equal(ref, out)),
            "public_ms": loop_ms(lambda: superlinear_attention(q1, q2, k, v, pos_dev, cfg, backend="triton"), reps),
            "entry_ms": loop_ms(lambda: entry(q1, q2, pos), reps),
            "entry_no_graph_ms": loop_ms(lambda: direct(q1, q2, pos), reps),
            "graph_ms": loop_ms(graph.replay, reps),
            "dense_graph_ms": loop_ms(dense_graph.replay, reps),
            # a lone call followed by a synchronisation: speed.timed's median wall seconds, in ms
            "public_lone_call_ms": 1e3 * timed(lambda: superlinear_attention(q1, q2, k, v, pos_dev, cfg,
                                                                             backend="triton"), 50),
            "entry_lone_call_ms": 1e3 * timed(lambda: entry(q1, q2, pos), 50),
            "entry_no_graph_lone_call_ms": 1e3 * timed(lambda: direct(q1, q2, pos), 50),
            "graph_lone_call_ms": 1e3 * timed(graph.replay, 50),
        }
    row["entry_over_graph"] = row["entry_ms"] / row["graph_ms"]
    row["public_over_graph"] = row["public_ms"] / row["graph_ms"]
    row["dense_over_graph"] = row["dense_graph_ms"] / row["graph_ms"]
    return row


def corpus_ids(tokenizer, n: int) -> torch.Tensor:
    """n byte-token ids of the repo's own prose and code (docs, README, package sources), repeated."""
    files = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"] + sorted((ROOT / "superlinear_lab").rglob("*.py"))
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in files if p.is_file())
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    return ids.repeat(-(-n // ids.numel()))[:n]


def timed_generate(session, mode: str, n: int, stream: bool = False) -> tuple[list[int], float]:
    session.decode = mode
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = list(session.stream(n, temperature=0)) if stream else session.generate(n, temperature=0)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def replay_ms(session, reps: int = 200) -> float | None:
    """Device ms of one replay of the session's captured step, back to back (writes past the cursor only). Each
    replay advances the device-held position, so the replays (1 + 5 loops of `reps`) are bounded by the spare cache
    slots past the cursor (the last slot, max_len - 1, is the capture's)."""
    decoder = session._decoder
    if decoder is None or decoder.graph is None:
        return None
    reps = min(reps, (session.max_len - 2 - session.cursor - 1) // 5)
    if reps < 1:
        return None
    saved = (session.cache.conv_states.clone(), session.cache.ssm_states.clone())
    decoder.position.fill_(session.cursor)
    ms = loop_ms(decoder.graph.replay, reps)
    session.cache.conv_states.copy_(saved[0])
    session.cache.ssm_states.copy_(saved[1])
    return ms


def step_profile(session, cp, steps: int = 8, top: int = 14) -> list[dict]:
    """Kernels of the eager one-token step (the graph replays the same kernels): device µs per step, by name."""
    from torch.profiler import ProfilerActivity, profile

    session.decode = "eager"
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        session.generate(steps, temperature=0)
        torch.cuda.synchronize()
    session.rollback(cp)
    rows = kernel_rows(prof, steps)
    kernels = sum(r["calls_per_step"] for r in rows)
    return [{"kernels_per_step": kernels, "us_per_step": sum(r["us_per_step"] for r in rows)}] + rows[:top]


def load(name: str, dtype: str):
    """The model of Part 2: "tiny" (shipped) or "exp-tiny" (`SuperlinearExpLM` in `SuperlinearExpConfig.tiny()`,
    random weights from seed 5, saved and loaded back as a checkpoint with a byte-level tokenizer)."""
    from superlinear_lab.model import load_model

    if name == "tiny":
        return load_model("tiny", device="cuda", dtype=dtype)
    import tempfile

    from superlinear_lab.loaders import SuperlinearExpConfig, load_checkpoint, save_checkpoint
    from superlinear_lab.loaders.model import SuperlinearExpLM
    from superlinear_lab.loaders.tokenizer import byte_level_tokenizer_json

    path = tempfile.mkdtemp(prefix="exp-tiny-")
    save_checkpoint(SuperlinearExpLM(SuperlinearExpConfig.tiny()).init_random(5), path,
                    tokenizer_json=byte_level_tokenizer_json())
    return load_checkpoint(path, device="cuda", dtype=dtype)


def session_rows(lengths: list[int], n_graph: int, n_forward: int, dtype: str, prefill_budget_s: float,
                 model_name: str = "tiny") -> list[dict]:
    from superlinear_lab.engine import Session

    model = load(model_name, dtype)
    ids = corpus_ids(model.tokenizer, max(lengths))
    spare = 2 * max(n_graph, n_forward) + 64
    s = Session(model, max_len=lengths[0] + spare, chunk_size=32768, progress=False)
    rows = []
    for length in lengths:
        s.grow(max(s.max_len, length + spare))
        torch.cuda.synchronize()
        t = time.perf_counter()
        s.append(ids[s.cursor:length], role=None)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t
        cp = s.checkpoint()
        row = {"model": model_name, "L": length, "max_len": s.max_len, "dtype": dtype, "prefill_s": prefill_s, "modes": {}}
        results = {}
        for mode, n, stream in (("auto", n_graph, False), ("auto", n_graph, True), ("eager", n_graph, False),
                                ("forward", n_forward, False)):
            s.rollback(cp)
            s.decode = mode
            s.generate(4, temperature=0)  # capture / compile outside the timing
            s.rollback(cp)
            out, secs = timed_generate(s, mode, n, stream)
            mode = mode + ("_stream" if stream else "")
            results[mode] = (out, s.logits.clone())
            row["modes"][mode] = {"path": s.decode_path, "fallback": s.decode_fallback, "tokens": len(out),
                                  "seconds": secs, "tokens_per_s": len(out) / secs if secs else None,
                                  "ms_per_token": 1e3 * secs / max(len(out), 1)}
        s.rollback(cp)
        row["graph_replay_ms"] = replay_ms(s)  # the step's device time alone (no sampling, no bookkeeping)
        row["step_kernels"] = step_profile(s, cp)
        s.rollback(cp)
        n_cmp = min(len(results["forward"][0]), len(results["auto"][0]))
        row["graph_tokens_equal_forward"] = results["auto"][0][:n_cmp] == results["forward"][0][:n_cmp]
        row["graph_tokens_equal_eager"] = results["auto"][0] == results["eager"][0]
        row["generate_equals_stream"] = results["auto"][0] == results["auto_stream"][0] and bool(
            torch.equal(results["auto"][1], results["auto_stream"][1]))
        row["graph_logits_equal_eager"] = bool(torch.equal(results["auto"][1], results["eager"][1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if prefill_s > prefill_budget_s:
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "session_decode.json"))
    parser.add_argument("--attention-lengths", default="131072,1048576")
    parser.add_argument("--session-lengths", default="131072,1048576,4194304")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=512, help="generated tokens per timing (graph, eager)")
    parser.add_argument("--forward-tokens", type=int, default=64, help="generated tokens per timing (forward)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefill-budget-s", type=float, default=120.0,
                        help="stop before the next length when a prefill took longer than this")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--model", default="tiny", choices=["tiny", "exp-tiny"], help="the model of Part 2")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("session_decode.py needs a CUDA device")
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "attention": [], "session": []}
    out = pathlib.Path(args.out)
    if not args.skip_attention:
        for length in map(int, args.attention_lengths.split(",")):
            row = attention_row(length, args.reps)
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            result["attention"].append(row)
            out.write_text(json.dumps(result, indent=2))
    result["session"] = session_rows(list(map(int, args.session_lengths.split(","))), args.tokens,
                                     args.forward_tokens, args.dtype, args.prefill_budget_s, args.model)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
