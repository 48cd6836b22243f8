"""The ``superlinear-lab`` command.

Each subcommand is one ``add_<name>(subparsers)`` function that builds its parser and sets ``func``; `COMMANDS`
lists them, so a new subcommand is one function and one entry. ``func(args)`` returns the exit status.

    superlinear-lab plan PATH --gpu-mem 80GB     memory plan for a checkpoint (no weights are loaded)
    superlinear-lab report PATH -o FILE.html     routing report of a document (one offline HTML file)
    superlinear-lab train …                      train / resume / export the model (superlinear_lab.train)
    superlinear-lab evaluate …                   NIAH grid and suites (superlinear_lab.evaluate)
    superlinear-lab retrofit …                   distil a transformers model's search query (superlinear_lab.hf.retrofit)
    superlinear-lab serve | chat | session … | snapshot …   the server and its HTTP clients (server/commands.py)
"""
from __future__ import annotations

import argparse
import json
import sys

from .server.commands import COMMANDS as SERVER_COMMANDS  # serve, chat, session, snapshot


def _size(text: str) -> int:
    from .loaders.memory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tokens(text: str) -> int:
    from .loaders.memory import parse_tokens

    try:
        return parse_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


# ---------------------------------------------------------------------- plan
PLAN_EPILOG = """\
PATH is a checkpoint directory (weights are summed from the safetensors shard headers; no tensor is read),
its config.json (weights from the parameter count), or the word `released` for the built-in
Superlinear-Exp-v0.1 layout (docs/algorithm.md §5).

sizes: GB/MB are SI (80GB = 80e9 bytes), GiB/MiB binary; token counts take K and M (1M = 1,048,576).

examples:
  superlinear-lab plan released --gpu-mem 80GB
  superlinear-lab plan ~/models/superlinear-exp-v0.1 --gpu-mem 141GB --sessions 4 --context 1M
  superlinear-lab plan released --gpu-mem 80GiB --dtype bfloat16 --json
"""


def add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="how long a session fits on a GPU (weights, KV per token, recurrent state)",
        description="Plan GPU memory for a Superlinear-Exp-style model: weights + reserve + prefill workspace + "
                    "sessions x (recurrent state + context x KV bytes per token).",
        epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="checkpoint directory, config.json, or 'released'")
    p.add_argument("--gpu-mem", required=True, type=_size, metavar="SIZE", help="GPU memory, e.g. 80GB or 141GB")
    p.add_argument("--sessions", type=_positive_int, default=1, metavar="N",
                   help="sessions sharing the GPU (default 1)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="model dtype (default: the checkpoint's; float16 for `released`)")
    p.add_argument("--chunk-size", type=_positive_int, default=4096, metavar="N",
                   help="prefill chunk length; sets the logits workspace (default 4096)")
    p.add_argument("--reserve", type=_size, default=2**30, metavar="SIZE",
                   help="allowance for CUDA context, allocator slack, activations (default 1GiB)")
    p.add_argument("--context", type=_tokens, default=None, metavar="TOKENS",
                   help="also report the total for this context per session, e.g. 1M")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    from .loaders import CheckpointError, SuperlinearExpConfig, plan_memory
    from .loaders.memory import format_bytes

    target = SuperlinearExpConfig.released() if args.path == "released" else args.path
    try:
        plan = plan_memory(target, args.gpu_mem, sessions=args.sessions, dtype=args.dtype,
                           chunk_size=args.chunk_size, reserve_bytes=args.reserve)
    except (CheckpointError, ValueError) as e:
        print(f"superlinear-lab plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = plan.to_dict()
        if args.context is not None:
            out["context"] = {"tokens": args.context, "total_bytes": plan.total_bytes(args.context),
                              "fits": plan.total_bytes(args.context) <= plan.gpu_bytes}
        print(json.dumps(out, indent=2))
        return 0
    print(plan)
    if args.context is not None:
        total = plan.total_bytes(args.context)
        verdict = "fits" if total <= plan.gpu_bytes else "does NOT fit"
        print(f"\n{args.context:,} tokens x {plan.sessions} session(s): KV {format_bytes(plan.kv_bytes(args.context))} "
              f"each, total {format_bytes(total)} -> {verdict}")
    return 0


# ---------------------------------------------------------------------- report
REPORT_MODEL = "small"  # reports are about real documents: the shipped model trained to find facts in prose
REPORT_EPILOG = """\
PATH is a UTF-8 text file, `-` for standard input, or `pydoc` for Python's own reference docs
(`pydoc_data.topics`, always present offline).

--model is a shipped model name (small, the default: trained to retrieve facts in prose; or tiny), a
directory with config.json + model.safetensors, a Superlinear-Exp checkpoint directory or a local
transformers causal-LM directory (the last two need the extra hf). The report names the model and its weights.

examples:
  superlinear-lab report notes.txt -o notes-routing.html
  superlinear-lab report pydoc --max-tokens 16K -o pydoc.html
  superlinear-lab report notes.txt --model ~/models/my-tiny -o mine.html
  superlinear-lab report pydoc --max-tokens 8K --evidence "debugging assertions" -o where.html
"""


def add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="routing report of a document to one self-contained HTML file",
        description="Run a document through a model while recording its routing, then write per-layer statistics, "
                    "the routing map and the coverage map as one HTML file (opens offline).",
        epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="text file, '-' (stdin) or 'pydoc'")
    p.add_argument("-o", "--output", default="routing-report.html", metavar="FILE",
                   help="HTML file to write (default routing-report.html)")
    p.add_argument("--model", default=REPORT_MODEL, metavar="NAME|PATH",
                   help=f"shipped model name, model directory or Superlinear-Exp checkpoint "
                        f"(default {REPORT_MODEL})")
    p.add_argument("--max-tokens", type=_tokens, default=None, metavar="TOKENS",
                   help="truncate the document, e.g. 16K (default: all of it)")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "oracle"), default="auto",
                   help="attention backend (default auto: triton on CUDA, torch otherwise)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--title", default=None, help="report title (default: the file name)")
    p.add_argument("--evidence", action="append", default=None, metavar="TEXT",
                   help="text to find in the document and mark: the report then shows, for every layer and head, "
                        "whether the last token reached it, and for a miss every stripe that would have covered it "
                        "with its rank and margin (repeatable)")
    p.set_defaults(func=run_report)


def run_report(args) -> int:
    from .loaders import open_model
    from .model import describe_model
    from .report import routing_report

    try:
        if args.path == "-":
            text = sys.stdin.read()
        elif args.path == "pydoc":
            from .data import reference_docs

            text = reference_docs()
        else:
            with open(args.path, encoding="utf-8") as f:
                text = f.read()
        model = open_model(args.model, device=args.device, backend=args.backend)
        out = routing_report(text, args.output, model, max_tokens=args.max_tokens,
                             title=args.title or f"Routing report: {args.path}", evidence=args.evidence)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        print(f"superlinear-lab report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (model: {describe_model(model)})")
    return 0


def _add_passthrough(subparsers, name: str, module: str, help_text: str) -> None:
    # prefix_chars="+" keeps argparse from reading the module's own "--options" here: they all go to its main().
    p = subparsers.add_parser(name, help=help_text, add_help=False, prefix_chars="+")
    p.add_argument("args", nargs=argparse.REMAINDER)

    def run(args) -> int:
        import importlib

        return importlib.import_module(module).main(args.args)
    p.set_defaults(func=run)


def add_train(subparsers) -> None:
    _add_passthrough(subparsers, "train", "superlinear_lab.train",
                     "train, resume or export the hybrid model (options: superlinear-lab train --help)")


def add_evaluate(subparsers) -> None:
    _add_passthrough(subparsers, "evaluate", "superlinear_lab.evaluate",
                     "NIAH grid, multi-needle and multi-hop suites (options: superlinear-lab evaluate --help)")


def add_retrofit(subparsers) -> None:
    _add_passthrough(subparsers, "retrofit", "superlinear_lab.hf.retrofit",
                     "distil a transformers model into its superlinear version (options: superlinear-lab retrofit "
                     "--help; extra hf)")


# ---------------------------------------------------------------------- entry point
COMMANDS = [add_plan, add_report, add_train, add_evaluate, add_retrofit, *SERVER_COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="superlinear-lab",
        description="superlinear-lab: Superlinear attention models, sessions and their memory.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
