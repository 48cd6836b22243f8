"""NaN-free building blocks shared by the oracle and the torch backend: a masked softmax that also
returns its log-sum-exp, the LSE merge of a span branch with the window branch (docs/algorithm.md §3.3) and the
gate (docs/algorithm.md §3.2). Empty key sets give output 0 and lse -inf, with finite gradients everywhere.
"""
from __future__ import annotations

import torch

# Invalid gate slots get this logit instead of -inf, so an all-invalid row is uniform (docs/algorithm.md §3.2).
INVALID_GATE_LOGIT = -1e9


def masked_attention(logits: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits over `allowed`) @ values and the log-sum-exp of the allowed logits.

    logits [..., M, N] fp32 (M queries, N keys), allowed: bool, broadcastable to logits,
    values [..., N, D]. Returns out [..., M, D] (0 for a query with nothing allowed) and
    lse [..., M] (-inf there).
    """
    logits = logits.masked_fill(~allowed, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(logits - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    out = (weights / safe_total) @ values
    lse = torch.where(nonempty, row_max + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)


def merge_with_window(span_out: torch.Tensor, span_lse: torch.Tensor,
                      win_out: torch.Tensor, win_lse: torch.Tensor) -> torch.Tensor:
    """O_k = (e^ℓk O_span + e^ℓw O_win) / (e^ℓk + e^ℓw), stably; both -inf gives O_win (docs/algorithm.md §3.3).

    span_out [..., K, D], span_lse [..., K], win_out [..., D], win_lse [...].
    """
    win_lse = win_lse.unsqueeze(-1)  # [..., 1]
    top = torch.maximum(span_lse, win_lse)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    w_span = torch.exp(span_lse - top)
    w_win = torch.exp(win_lse - top).expand_as(w_span)
    both_empty = (w_span == 0) & (w_win == 0)
    w_win = torch.where(both_empty, torch.ones_like(w_win), w_win)
    total = w_span + w_win
    return (w_span.unsqueeze(-1) * span_out + w_win.unsqueeze(-1) * win_out.unsqueeze(-2)) / total.unsqueeze(-1)


def gate_weights(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """g = softmax_k(ṽ_k), ṽ_k = v_k on valid slots and -1e9 on invalid ones (docs/algorithm.md §3.2). [..., K] fp32."""
    logits = torch.where(valid, values, torch.full_like(values, INVALID_GATE_LOGIT))
    return torch.softmax(logits, dim=-1)
