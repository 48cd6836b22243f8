"""Batched decode (`superlinear_lab.engine.batch.decode_step`): one forward for sessions at different positions
gives each session what its own one-token step gives (logits, K/V at the cursor, conv/SSM states), and leaves
the sessions' book-keeping alone. No server here."""
from __future__ import annotations

import pytest
import torch

from superlinear_lab.engine import Session
from superlinear_lab.engine.batch import can_batch, decode_step, forward_rows
from superlinear_lab.model import ModelConfig, load_model

# lengths below the window (15), around it, and far enough that routed spans are chosen by the search
LENGTHS = [1, 9, 16, 40, 150, 333]


@pytest.fixture(scope="module")
def tiny(one_thread):
    return load_model(config=ModelConfig.tiny(), backend="torch")


def sessions_of(model, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        s = Session(model, 512, progress=False)
        s.append(torch.randint(0, 256, (n,), generator=gen).tolist(), role=None)
        out.append(s)
    return out


def test_batched_step_equals_each_sessions_own_step(tiny):
    batch = sessions_of(tiny, LENGTHS)
    alone = [s.fork() for s in batch]
    tokens = [3, 77, 200, 10, 255, 42]
    logits = decode_step(batch, tokens)
    assert logits.shape == (len(LENGTHS), tiny.cfg.vocab_size) and logits.dtype == torch.float32
    for s, ref, token, row in zip(batch, alone, tokens, logits):
        c = s.cursor
        assert c == ref.cursor  # book-keeping is the caller's
        ref.append([token], role=None)  # the session's own one-token forward
        torch.testing.assert_close(row, ref.logits, atol=2e-5, rtol=1e-5)
        for j in range(len(s.cache.keys)):
            torch.testing.assert_close(s.cache.keys[j][0, :, c], ref.cache.keys[j][0, :, c], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(s.cache.values[j][0, :, c], ref.cache.values[j][0, :, c], atol=1e-6,
                                       rtol=1e-6)
            # nothing before the cursor moved
            assert torch.equal(s.cache.keys[j][0, :, :c], ref.cache.keys[j][0, :, :c])
        torch.testing.assert_close(s.cache.conv_states, ref.cache.conv_states, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(s.cache.ssm_states, ref.cache.ssm_states, atol=1e-6, rtol=1e-6)


def test_batched_chunks_equal_each_sessions_own_prefill(tiny):
    """Equal-length chunks at different cursors (batched prefill), including rows starting from empty."""
    batch = sessions_of(tiny, LENGTHS, seed=2) + [Session(tiny, 512, progress=False)]
    alone = [s.fork() for s in batch]
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 256, (len(batch), 37), generator=gen).tolist()
    logits = forward_rows(batch, rows)
    assert logits.shape == (len(batch), 37, tiny.cfg.vocab_size)
    for s, ref, row, out in zip(batch, alone, rows, logits):
        c = s.cursor
        ref.append(row, role=None)
        torch.testing.assert_close(out[-1], ref.logits, atol=2e-5, rtol=1e-5)
        for j in range(len(s.cache.keys)):
            torch.testing.assert_close(s.cache.keys[j][0, :, c:c + 37], ref.cache.keys[j][0, :, c:c + 37],
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.cache.ssm_states, ref.cache.ssm_states, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one length"):
        forward_rows(batch[:2], [[1, 2], [3]])


def test_rows_do_not_leak_into_each_other(tiny):
    """A row's result does not depend on which other rows share the batch."""
    batch = sessions_of(tiny, LENGTHS, seed=1)
    copies = [s.fork() for s in batch]
    together = decode_step(batch, [5] * len(batch))
    for i, s in enumerate(copies):
        torch.testing.assert_close(decode_step([s], [5])[0], together[i], atol=2e-5, rtol=1e-5)


def test_refusals_leave_sessions_untouched(tiny):
    a, b = sessions_of(tiny, [4, 6])
    before = [s.cache.ssm_states.clone() for s in (a, b)]
    with pytest.raises(ValueError, match="same length"):
        decode_step([a, b], [1])
    with pytest.raises(ValueError, match="distinct"):
        decode_step([a, a], [1, 2])
    with pytest.raises(ValueError, match="token ids"):
        decode_step([a, b], [1, 10_000])
    full = Session(tiny, 8, progress=False)
    full.append(list(range(7)), role=None)
    with pytest.raises(ValueError, match="no room"):
        decode_step([a, full], [1, 2])
    for s, state in zip((a, b), before):
        assert torch.equal(s.cache.ssm_states, state)


def test_tracing_hooks_disable_batching(tiny):
    assert can_batch(tiny)
    with tiny.trace():
        assert not can_batch(tiny)
    assert can_batch(tiny)
