"""``python -m superlinear_lab.hf.retrofit`` (= ``superlinear-lab retrofit``): the command line of the retrofit in
`superlinear_lab.hf.distill` (options: ``--help``). Kept apart so the package never imports this entry module."""
import sys

from .distill import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
