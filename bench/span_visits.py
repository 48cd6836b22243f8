"""CPU: how much the span dK/dV kernel visits and gathers, from a real routing of random inputs (no GPU).

The release layer's search (torch backend) on random q1 / k of one KV group with `--heads` query heads, then the
kernel's own host-side steps: the pair sort (`span.sort_pairs`, its key kernel in Triton's interpreter), the tiles'
key ranges and each key block's run of tiles (`span.tile_key_ranges`). Per key block, a trip of the run is a visit when
the tile's key range meets the block (the kernel's skip test). Prints the pairs' span lengths, trips, visits, the
skipped share and visits per tile; scaled to the release layer's 16 heads x 2 KV groups, the visits' tensor-core work
(four 64 x 64 x D products each) and gathered q/dO bytes (2 x 64 rows of D bf16 each).

    TRITON_INTERPRET=1 .venv/bin/python bench/span_visits.py --length 131072 [--heads 2]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # sort_pairs' key kernel on the CPU

import torch  # noqa: E402

from superlinear_kernels import SpanConfig, span_search  # noqa: E402
from superlinear_kernels.triton import span  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--heads", type=int, default=2, help="query heads of the one KV group searched")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg, d, length = SpanConfig.release(), 128, args.length
    gen = torch.Generator().manual_seed(args.seed)
    q1 = torch.randn(1, args.heads, length, d, generator=gen)
    k = torch.randn(1, 1, length, d, generator=gen)
    began = time.perf_counter()
    routing = span_search(q1, k, torch.arange(length), cfg, backend="torch")
    print(f"search {time.perf_counter() - began:.1f} s", flush=True)
    qs, qe = routing.qstart, routing.qend
    live = (qs >= 0) & (qe >= qs)
    spans = (qe - qs + 1)[live].double()
    block_n, tile = span.KV_BLOCK_N or 128, span.KV_TILE
    order = span.sort_pairs(qs, qe, 1, span._blocks(d)[1], length)
    sqs, sqe = (x.reshape(1, -1)[:, order] for x in (qs, qe))
    lo, hi, ranges = span.tile_key_ranges(sqs, sqe, tile, length, block_n)
    visits = trips = 0
    for block in range(ranges.shape[1]):
        first, last = (int(x) for x in ranges[0, block])
        if last > first:
            k0 = block * block_n
            trips += last - first
            visits += int(((lo[0, first:last] < k0 + block_n) & (hi[0, first:last] >= k0)).sum())  # the kernel's test
    n_tiles = lo.shape[1]
    per_tile = visits / n_tiles
    release_tiles = 2 * 16 * length * cfg.num_spans // tile
    release_visits = per_tile * release_tiles
    print(f"L {length}, {args.heads} heads: pairs {qs.numel()} (live {int(live.sum())}), span keys mean "
          f"{float(spans.mean()):.0f} median {float(spans.median()):.0f}; {block_n}-key blocks {ranges.shape[1]}, "
          f"{tile}-pair tiles {n_tiles}; trips {trips}, visits {visits} ({1 - visits / max(trips, 1):.1%} skipped), "
          f"visits per tile {per_tile:.1f}")
    print(f"release layer (16 heads x 2 KV groups, by visits per tile): {release_tiles} tiles, ~{release_visits:.3g} "
          f"visits, ~{release_visits * 4 * 2 * block_n * tile * d / 1e12:.1f} TFLOP of tile products, "
          f"~{release_visits * 2 * tile * d * 2 / 1e9:.0f} GB of gathered q/dO rows")


if __name__ == "__main__":
    main()
