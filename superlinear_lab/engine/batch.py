"""Batched forward over several sessions: the next token of each (decode) or an equal-length chunk of each
(prefill), in one forward.

Sessions sit at different positions, so the rows cannot share one position frame as they are. Every layer but
attention is position-free (Mamba-2 mixers, MLPs, norms, projections) and simply runs on the stacked rows. Attention
runs once over a **left-padded** copy of the rows' caches: row b's keys 0 … c_b - 1 are placed at
P - c_b … P - 1 (P = the largest cursor), its new keys at P … P + L - 1, and the attention mask starts the row at
s_b = P - c_b.
The routing of a left-padded row depends only on positions relative to its row start (anchors q + 1 - F(i),
candidates a >= s, spans and window clamped to s, span lengths from t = q + 1 - s: docs/algorithm.md §1.4–1.7), so each row
attends exactly as its own unpadded session would (up to float summation order).

The copy costs O(B · P) per attention layer and step, so callers batch only sessions whose cursor is at most a
bound (`ChatEngine` uses 4096) and decode longer ones alone. Routing recorders and token recorders (tracing) are
not supported here (nor routing overrides): `can_batch(model)` is False while any is attached.
"""
from __future__ import annotations

import torch

from superlinear_kernels import superlinear_attention

from ..model.hybrid import HybridLM
from .decode import hooks_attached
from .session import Session


def can_batch(model) -> bool:
    """True for a `HybridLM` with no tracing or intervention hook attached (batched steps do not call them; other
    model classes, e.g. converted transformers models, run one session at a time)."""
    return isinstance(model, HybridLM) and not hooks_attached(model)


@torch.no_grad()
def decode_step(sessions: list[Session], tokens: list[int]) -> torch.Tensor:
    """Run ``tokens[b]`` at ``sessions[b].cursor`` for every b in one forward: `forward_rows` with one token per
    row. Returns fp32 logits [B, vocab]."""
    if not sessions or len(sessions) != len(tokens):
        raise ValueError(f"sessions/tokens: expected two lists of the same length >= 1, got {len(sessions)} and "
                         f"{len(tokens)}")
    return forward_rows(sessions, [[t] for t in tokens])[:, 0]


@torch.no_grad()
def forward_rows(sessions: list[Session], rows: list[list[int]]) -> torch.Tensor:
    """Run ``rows[b]`` (L tokens, the same L for every row) at ``sessions[b].cursor`` … cursor + L - 1 for every b
    in one forward (batched decode for L = 1, batched prefill of equal-length chunks for L > 1).

    Writes each row's K/V at its positions and its advanced conv/SSM states into its session's cache; the
    session's cursor, token ids and logits are *not* touched (the caller records the tokens on each session). K/V
    written past a cursor is unobservable and the states are written only after the whole forward succeeded, so an
    exception leaves every session as it was.

    Args:
        sessions: B >= 1 distinct sessions on the same model, each with cursor + L < max_len.
        rows: B lists of L >= 1 token ids.

    Returns:
        fp32 logits [B, L, vocab] after each token.
    """
    if not sessions or len(sessions) != len(rows) or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ValueError(f"sessions/rows: expected B >= 1 sessions and B rows of one length L >= 1, got "
                         f"{len(sessions)} sessions and row lengths {sorted({len(r) for r in rows})}")
    model = sessions[0].model
    if any(s.model is not model for s in sessions) or len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("sessions: expected distinct sessions on one model")
    length = len(rows[0])
    for s in sessions:
        if s.cursor + length >= s.max_len:
            raise ValueError(f"session at cursor {s.cursor} has no room for {length} token(s) (max_len {s.max_len})")
    cfg, device = model.cfg, model.device
    ids = torch.tensor(rows, dtype=torch.int64, device=device)  # [B, L]
    model.check_ids(ids)
    bsz = len(sessions)
    cursors = torch.tensor([s.cursor for s in sessions], dtype=torch.int64, device=device)
    top = int(cursors.max())  # the rows' new tokens sit at top … top + L - 1 in the padded frame
    offsets = top - cursors  # row starts s_b in the padded frame
    mask = torch.arange(top + length, device=device)[None, :] >= offsets[:, None]  # [B, P + L], left-padded
    positions = torch.arange(top, top + length, dtype=torch.int64, device=device)
    conv = torch.cat([s.cache.conv_states for s in sessions], dim=1)  # [n_mamba, B, conv_dim, K-1]
    ssm = torch.cat([s.cache.ssm_states for s in sessions], dim=1)  # [n_mamba, B, H, P, N]
    new_conv, new_ssm = torch.empty_like(conv), torch.empty_like(ssm)
    new_kv = []  # (attention layer j, k [B, H_KV, L, D], v [B, H_KV, L, D])

    x = model.embed(ids)
    att_j = mamba_j = 0
    for block in model.blocks:
        h = block.norm1(x)
        if block.kind == "M":
            h, new_conv[mamba_j], new_ssm[mamba_j] = block.mixer(h, conv[mamba_j], ssm[mamba_j])
            mamba_j += 1
        else:
            layer = block.mixer
            hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
            q1 = layer.q1_proj(h).view(bsz, length, hq, d).transpose(1, 2)
            q2 = layer.q2_proj(h).view(bsz, length, hq, d).transpose(1, 2)
            k = layer.k_proj(h).view(bsz, length, hkv, d).transpose(1, 2)
            v = layer.v_proj(h).view(bsz, length, hkv, d).transpose(1, 2)
            keys = k.new_zeros(bsz, hkv, top + length, d)
            values = v.new_zeros(bsz, hkv, top + length, d)
            for b, s in enumerate(sessions):
                c = s.cursor
                keys[b, :, top - c:top] = s.cache.keys[att_j][0, :, :c]
                values[b, :, top - c:top] = s.cache.values[att_j][0, :, :c]
            keys[:, :, top:] = k
            values[:, :, top:] = v
            out = superlinear_attention(q1, q2, keys, values, positions, layer.span_config, attention_mask=mask,
                                        backend=layer.backend)
            h = layer.o_proj(out.transpose(1, 2).reshape(bsz, length, hq * d))
            new_kv.append((att_j, k, v))
            att_j += 1
        x = x + h
        x = x + block.mlp(block.norm2(x))
    x = model.norm_f(x)
    weight = model.embed.weight if model.lm_head is None else model.lm_head.weight
    logits = (x @ weight.t()).float()  # [B, L, vocab]
    # commit: K/V at each row's positions, then the advanced states
    for b, s in enumerate(sessions):
        c = s.cursor
        for j, k, v in new_kv:
            s.cache.keys[j][0, :, c:c + length] = k[b]
            s.cache.values[j][0, :, c:c + length] = v[b]
        s.cache.conv_states[:, 0] = new_conv[:, b]
        s.cache.ssm_states[:, 0] = new_ssm[:, b]
    return logits
