"""Batched decode: one forward computes the next token of several sessions at once.

Sessions sit at different positions, so the rows cannot share one position frame as they are. Every layer but
attention is position-free (Mamba-2 mixers, MLPs, norms, projections) and simply runs on the stacked rows. Attention
runs once over a **left-padded** copy of the rows' caches: row b's keys 0 … c_b - 1 are placed at
P - c_b … P - 1 (P = the largest cursor), its new key at P, and the attention mask starts the row at s_b = P - c_b.
The routing of a left-padded row depends only on positions relative to its row start (anchors q + 1 - F(i),
candidates a >= s, spans and window clamped to s, span lengths from t = q + 1 - s: SPEC §1.4–1.7), so each row
attends exactly as its own unpadded session would (up to float summation order).

The copy costs O(B · P) per attention layer and step, so callers batch only sessions whose cursor is at most a
bound (`ChatEngine` uses 4096) and decode longer ones alone. Routing recorders and token recorders (tracing) are
not supported here (nor routing overrides): `can_batch(model)` is False while any is attached.
"""
from __future__ import annotations

import torch

from superlinear_kernels import superlinear_attention

from .session import Session


def can_batch(model) -> bool:
    """True when no tracing or intervention hook is attached to `model` (batched steps do not call them)."""
    if model.token_recorders:
        return False
    return not any(layer.routing_recorders or getattr(layer, "routing_overrides", None)
                   for _, layer in model.routing_layers())


@torch.no_grad()
def decode_step(sessions: list[Session], tokens: list[int]) -> torch.Tensor:
    """Run ``tokens[b]`` at ``sessions[b].cursor`` for every b in one forward.

    Writes each row's K/V at its cursor and its advanced conv/SSM states into its session's cache; the session's
    cursor, token ids and logits are *not* touched (the caller records the step on each session). K/V written past
    a cursor is unobservable and the states are written only after the whole forward succeeded, so an exception
    leaves every session as it was.

    Args:
        sessions: B >= 1 distinct sessions on the same model, each with cursor + 1 < max_len.
        tokens: B token ids.

    Returns:
        fp32 logits [B, vocab] after each row's new token.
    """
    if not sessions or len(sessions) != len(tokens):
        raise ValueError(f"sessions/tokens: expected two lists of the same length >= 1, got {len(sessions)} and "
                         f"{len(tokens)}")
    model = sessions[0].model
    if any(s.model is not model for s in sessions) or len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("sessions: expected distinct sessions on one model")
    for s in sessions:
        if s.cursor + 1 >= s.max_len:
            raise ValueError(f"session at cursor {s.cursor} has no room for a token (max_len {s.max_len})")
    cfg, device = model.cfg, model.device
    ids = torch.tensor(tokens, dtype=torch.int64, device=device)[:, None]  # [B, 1]
    model.check_ids(ids)
    bsz = len(sessions)
    cursors = torch.tensor([s.cursor for s in sessions], dtype=torch.int64, device=device)
    top = int(cursors.max())
    offsets = top - cursors  # row starts s_b in the padded frame
    mask = torch.arange(top + 1, device=device)[None, :] >= offsets[:, None]  # [B, P + 1], left-padded
    positions = torch.tensor([top], dtype=torch.int64, device=device)
    conv = torch.cat([s.cache.conv_states for s in sessions], dim=1)  # [n_mamba, B, conv_dim, K-1]
    ssm = torch.cat([s.cache.ssm_states for s in sessions], dim=1)  # [n_mamba, B, H, P, N]
    new_conv, new_ssm = torch.empty_like(conv), torch.empty_like(ssm)
    new_kv = []  # (attention layer j, k [B, H_KV, D], v [B, H_KV, D])

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
            q1 = layer.q1_proj(h).view(bsz, 1, hq, d).transpose(1, 2)
            q2 = layer.q2_proj(h).view(bsz, 1, hq, d).transpose(1, 2)
            k = layer.k_proj(h).view(bsz, hkv, d)
            v = layer.v_proj(h).view(bsz, hkv, d)
            keys = k.new_zeros(bsz, hkv, top + 1, d)
            values = v.new_zeros(bsz, hkv, top + 1, d)
            for b, s in enumerate(sessions):
                c = s.cursor
                keys[b, :, top - c:top] = s.cache.keys[att_j][0, :, :c]
                values[b, :, top - c:top] = s.cache.values[att_j][0, :, :c]
            keys[:, :, top] = k
            values[:, :, top] = v
            out = superlinear_attention(q1, q2, keys, values, positions, layer.span_config, attention_mask=mask,
                                        backend=layer.backend)
            h = layer.o_proj(out.transpose(1, 2).reshape(bsz, 1, hq * d))
            new_kv.append((att_j, k, v))
            att_j += 1
        x = x + h
        x = x + block.mlp(block.norm2(x))
    x = model.norm_f(x)
    weight = model.embed.weight if model.lm_head is None else model.lm_head.weight
    logits = (x @ weight.t()).float()[:, 0]  # [B, vocab]
    # commit: K/V at each cursor, then the advanced states
    for b, s in enumerate(sessions):
        c = s.cursor
        for j, k, v in new_kv:
            s.cache.keys[j][0, :, c] = k[b]
            s.cache.values[j][0, :, c] = v[b]
        s.cache.conv_states[:, 0] = new_conv[:, b]
        s.cache.ssm_states[:, 0] = new_ssm[:, b]
    return logits
