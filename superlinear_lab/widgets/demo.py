"""Teaching traces from real text without a trained model, for the lessons, tests and the redraw benchmark.

The text is Python's own reference documentation (`pydoc_data.topics`, always offline), one token per byte.
Keys imitate the hybrid model's "accumulation → representative" idea (docs/algorithm.md §1.7): the key at position a is an
exponentially decaying summary of the byte embeddings up to a, so an anchor shortly after a phrase still
"remembers" it. Each query head gets a simple, readable search intent:

* ``needle``   — always searches for the summary of a given phrase (the needle of a retrieval task);
* ``newline``  — searches for line starts;
* ``context``  — searches for keys like its own (recent-context similarity);
* ``random``   — a random search query per position (no intent: the control).

The routing itself is computed by the real kernels (`span_search`, `stripe_scores`) and packed with
`RoutingTrace.from_search`, so everything the views show follows docs/algorithm.md §1–3 exactly.
"""
from __future__ import annotations

import torch

from superlinear_kernels import SpanConfig, span_search, stripe_scores
from superlinear_lab.trace import RoutingTrace

HEADS = ("needle", "newline", "context", "random")


def reference_text(n_chars: int) -> str:
    """The first `n_chars` characters of Python's reference docs (topics in sorted order), ASCII only."""
    from pydoc_data.topics import topics

    parts, total = [], 0
    for name in sorted(topics):
        body = topics[name].encode("ascii", "replace").decode("ascii")
        parts.append(body)
        total += len(body)
        if total >= n_chars:
            break
    text = "".join(parts)
    while len(text) < n_chars:  # only for very long requests: repeat the docs
        text += text
    return text[:n_chars]


def plant(text: str, needle: str, depths: list[float]) -> tuple[str, list[tuple[int, int]]]:
    """Insert `needle` at each relative depth (0 = start, 1 = end) of `text`, at a line start.

    Returns the new text and the inclusive character ranges of each planted copy, in order.
    """
    if not needle:
        raise ValueError("needle: expected a non-empty string")
    cuts = []
    for d in sorted(depths):
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth={d}: expected a number in [0, 1]")
        i = int(d * len(text))
        nl = text.rfind("\n", 0, i)
        cuts.append(nl + 1 if nl >= 0 else 0)
    out, ranges, last = [], [], 0
    for c in cuts:
        out.append(text[last:c])
        start = sum(len(s) for s in out)
        ranges.append((start, start + len(needle) - 1))
        out.append(needle)
        last = c
    out.append(text[last:])
    return "".join(out), ranges


def _summaries(ids: torch.Tensor, emb: torch.Tensor, decay: float, taps: int) -> torch.Tensor:
    """[L, D]: Σ_{j ≤ a, a − j < taps} decay^(a − j) · emb[ids[j]], a causal decaying summary (conv1d)."""
    x = emb[ids].T[None]  # [1, D, L]
    kernel = decay ** torch.arange(taps - 1, -1, -1, dtype=torch.float32)
    d = x.shape[1]
    weight = kernel.repeat(d, 1, 1)  # depthwise [D, 1, taps]
    y = torch.nn.functional.conv1d(torch.nn.functional.pad(x, (taps - 1, 0)), weight, groups=d)
    return y[0].T


def demo_trace(text: str, cfg: SpanConfig | None = None, needle: str | None = None, queries=None,
               profile_queries=None, dim: int = 64, decay: float = 0.985, gain: float = 6.0,
               seed: int = 0, backend: str = "torch") -> RoutingTrace:
    """A `RoutingTrace` of one attention layer with the four heads of `HEADS` over the bytes of `text`.

    Args:
        text: the document (ASCII; other bytes are shown as '·').
        cfg: the `SpanConfig` (default `SpanConfig.default()`).
        needle: the phrase the ``needle`` head searches for (default: the first 24 characters of `text`).
        queries: positions to record (default: all).
        profile_queries: positions whose full stripe-score profile is recorded (default: the last position).
        dim: key dimension D; decay/taps: the key summary's memory; gain: sharpness of the search.
        seed: seed of the byte embedding and of the random head.
        backend: the `span_search` backend ("torch", or "oracle" for short texts).
    """
    cfg = SpanConfig.default() if cfg is None else cfg
    data = text.encode("ascii", "replace")
    length = len(data)
    if length < 2:
        raise ValueError("text: expected at least 2 characters")
    ids = torch.tensor(list(data), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(256, dim, generator=gen), dim=1)
    taps = min(length, 320)
    keys = _summaries(ids, emb, decay, taps)
    keys = keys - keys.mean(dim=0, keepdim=True)  # remove what every English byte shares
    keys = torch.nn.functional.normalize(keys, dim=1)
    needle = text[:24] if needle is None else needle
    nid = torch.tensor(list(needle.encode("ascii", "replace")), dtype=torch.long)
    probe = _summaries(nid, emb, decay, min(len(nid), taps))[-1] - _summaries(ids, emb, decay, taps).mean(0)
    probe = torch.nn.functional.normalize(probe, dim=0)
    newline = torch.nn.functional.normalize(emb[ord("\n")] - emb.mean(0), dim=0)
    q1 = torch.stack([
        gain * probe.expand(length, dim),
        gain * newline.expand(length, dim),
        gain * keys,
        gain * torch.nn.functional.normalize(torch.randn(length, dim, generator=gen), dim=1),
    ])[None]  # [1, 4, L, D]
    k = keys[None, None].contiguous()  # [1, 1, L, D]
    positions = torch.arange(length) if queries is None else torch.as_tensor(list(queries), dtype=torch.long)
    routing = span_search(q1[:, :, positions].contiguous(), k, positions, cfg, backend=backend)
    prof = torch.tensor([length - 1]) if profile_queries is None else torch.as_tensor(list(profile_queries))
    prof_scores = stripe_scores(q1[:, :, prof], k, prof, cfg)
    tokens = [chr(b) if 32 <= b < 127 or b in (9, 10) else "·" for b in data]
    return RoutingTrace.from_search(routing, positions, cfg, stripe_scores=prof_scores, profile_queries=prof,
                                    length=length, tokens=tokens, token_ids=ids)


def stack_layers(traces: list[RoutingTrace], indices: list[int] | None = None) -> RoutingTrace:
    """One multi-layer `RoutingTrace` from single-layer traces of the same tokens and queries: layer i of the
    result is the (only) layer of `traces[i]`, renumbered `indices[i]` (default 0, 1, …). Lets the lessons and
    tests show layers that route differently without a model."""
    import dataclasses

    indices = list(range(len(traces))) if indices is None else list(indices)
    if not traces or len(indices) != len(traces):
        raise ValueError(f"indices: {len(indices)} entries for {len(traces)} traces (expected equal, >= 1)")
    first = traces[0]
    records = {}
    for index, tr in zip(indices, traces):
        if len(tr.layers) != 1:
            raise ValueError(f"traces: each must hold one layer, got layers {tr.layers}")
        if tr.length != first.length or not torch.equal(tr.queries, first.queries):
            raise ValueError("traces: expected the same length and recorded queries in every trace")
        records[int(index)] = dataclasses.replace(tr.layer(tr.layers[0]), index=int(index))
    return RoutingTrace(records, first.length, first.row_start, token_ids=first.token_ids, tokens=first.tokens)
