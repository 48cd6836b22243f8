"""Session public state API (export/check/from/restore state, add_message, set_transcript), checkpoint validation
(issue 18 #10) and fork independence of token ids (issue 17)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from superlinear_lab.engine import Session, SessionError, SessionState

from test_session import assert_same_state, state

TEXT = "Stripes of anchors, then spans around the best keys. " * 3

pytestmark = pytest.mark.usefixtures("one_thread")


def started(model, text=TEXT[:90], max_len=256, **kw):
    s = Session(model, max_len=max_len, progress=False, **kw)
    s.append(text)
    s.generate(4)
    return s


# --------------------------------------------------------------------------- issue 17: forks own their token ids
def test_fork_token_ids_are_independent(model):
    s = Session(model, max_len=128, progress=False)
    s.append("shared prefix ")
    child = s.fork()
    child.append("BBBB", role=None)
    s.append("AAAA", role=None)  # written at the same positions as the child's BBBB
    assert s.text() == "shared prefix AAAA"
    assert child.text() == "shared prefix BBBB"  # a shared `_token_ids` would read "shared prefix AAAA" here
    grandchild = child.fork()
    grandchild.append("CC", role=None)
    child.append("DD", role=None)
    assert (child.text(), grandchild.text()) == ("shared prefix BBBBDD", "shared prefix BBBBCC")


# --------------------------------------------------------------------------- state API
def test_export_from_state_round_trip_is_bit_exact(model):
    s = started(model)
    st = s.export_state()
    assert st.cursor == s.cursor and st.max_len == s.max_len and st.transcript == s.transcript
    assert all(t.device.type == "cpu" for t in (st.token_ids, st.conv_states, st.ssm_states, *st.keys, *st.values))
    back = Session.from_state(model, st)
    assert back.logits is None and back.cursor == s.cursor and torch.equal(back.ids, s.ids)
    assert back.transcript == s.transcript and back.transcript is not s.transcript
    for a, b in zip(s.cache.keys + s.cache.values, back.cache.keys + back.cache.values):
        assert torch.equal(a[:, :, :s.cursor], b[:, :, :s.cursor])
    s.append(" more")
    back.append(" more")
    assert torch.equal(s.logits, back.logits)
    bigger = Session.from_state(model, st, max_len=512)
    assert bigger.max_len == 512 and bigger.cursor == st.cursor
    with pytest.raises(ValueError, match="max_len"):
        Session.from_state(model, st, max_len=st.max_len - 1)
    # The exported state is a copy: changing the session later does not change it.
    assert st.cursor == back.cursor - 5


def _bad_states(model, st: SessionState):
    """(label, broken state, message regex): one per field and kind of damage."""
    k0 = st.keys[0]
    nan_key = k0.clone()
    nan_key.view(-1)[k0.numel() // 2] = float("nan")
    inf_ssm = st.ssm_states.clone()
    inf_ssm.view(-1)[3] = float("inf")
    vocab = model.cfg.vocab_size
    r = dataclasses.replace
    return [
        ("not-a-state", "state", r"state: expected a SessionState"),
        ("max_len-0", r(st, max_len=0), r"state\.max_len"),
        ("max_len-bool", r(st, max_len=True), r"state\.max_len"),
        ("cursor-at-max_len", r(st, max_len=st.cursor), "must be < max_len"),
        ("ids-int32", r(st, token_ids=st.token_ids.int()), r"state\.token_ids"),
        ("ids-2d", r(st, token_ids=st.token_ids[None]), r"state\.token_ids"),
        ("ids-list", r(st, token_ids=st.token_ids.tolist()), r"state\.token_ids"),
        ("ids-vocab", r(st, token_ids=torch.full_like(st.token_ids, vocab)), "outside"),
        ("ids-negative", r(st, token_ids=torch.full_like(st.token_ids, -1)), "outside"),
        ("keys-missing-layer", r(st, keys=st.keys[1:]), r"state\.keys: expected"),
        ("keys-nan", r(st, keys=(nan_key,) + st.keys[1:]), "NaN"),
        ("keys-fp16", r(st, keys=(k0.half(),) + st.keys[1:]), r"state\.keys\[0\]"),
        ("keys-short", r(st, keys=(k0[:, :, :-1],) + st.keys[1:]), r"state\.keys\[0\]"),
        ("values-broadcastable", r(st, values=(st.values[0][:, :1],) + st.values[1:]), r"state\.values\[0\]"),
        ("conv-broadcastable", r(st, conv_states=st.conv_states[:1]), r"state\.conv_states"),
        ("ssm-broadcastable", r(st, ssm_states=st.ssm_states[..., :1]), r"state\.ssm_states"),
        ("ssm-f64", r(st, ssm_states=st.ssm_states.double()), r"state\.ssm_states"),
        ("ssm-inf", r(st, ssm_states=inf_ssm), "NaN or infinite"),
        ("transcript-not-list", r(st, transcript="x"), r"state\.transcript"),
        ("transcript-extra-key", r(st, transcript=({"role": "u", "content": "c", "tokens": 1, "x": 1},)),
         r"state\.transcript\[0\]"),
        ("transcript-too-many-tokens", r(st, transcript=({"role": "u", "content": "c", "tokens": 10 ** 9},)),
         "more than the"),
        ("transcript-surrogate", r(st, transcript=({"role": "u", "content": "\ud800", "tokens": 1},)), "unicode"),
    ]


def test_check_state_refuses_every_broken_field_before_writing(model):
    s = started(model)
    st = s.export_state()
    target = started(model, text=TEXT[:40])
    before = state(target)
    cases = _bad_states(model, st)
    for label, bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            Session.check_state(model, bad)
        with pytest.raises(ValueError, match=pattern):
            target.restore_state(bad)
        assert_same_state(before, state(target))
    target.restore_state(st)  # the intact state is accepted
    assert torch.equal(target.ids, s.ids) and target.logits is None


def test_restore_state_makes_older_checkpoints_stale(model):
    s = started(model)
    cp = s.checkpoint()
    other = started(model, text=TEXT[40:100]).export_state()
    s.restore_state(other)
    with pytest.raises(SessionError, match="stale"):
        s.rollback(cp)
    assert torch.equal(s.ids, other.token_ids)


def test_add_message_and_set_transcript_validate(model):
    s = Session(model, max_len=128, progress=False)
    ids = model.tokenizer.encode("hello there")
    s.append(ids[:5], role=None)
    s.append(ids[5:], role=None)
    s.add_message("user", "hello there", len(ids))
    assert s.transcript == ({"role": "user", "content": "hello there", "tokens": len(ids)},)
    before = s.transcript
    for args, pattern in ((("user", "x", 1), "more than"), ((1, "x", 0), "strings"), (("u", None, 0), "strings"),
                          (("u", "x", -1), "tokens"), (("u", "x", 1.0), "tokens"), (("u", "x", True), "tokens")):
        with pytest.raises(ValueError, match=pattern):
            s.add_message(*args)
        assert s.transcript == before
    with pytest.raises(AttributeError):
        s.transcript.append({"role": "user", "content": "x", "tokens": 1})  # read-only: no way around the checks
    s.transcript[0]["tokens"] = 10 ** 6  # a copy: the session's own message is unchanged
    assert s.transcript == before
    kept = [{"role": "user", "content": "hello", "tokens": 5}]
    s.set_transcript(kept)
    kept[0]["content"] = "changed"  # deep-copied
    assert s.transcript == ({"role": "user", "content": "hello", "tokens": 5},)
    with pytest.raises(ValueError, match="expected exactly the keys"):
        s.set_transcript([{"role": "user", "content": "x"}])
    assert s.transcript == ({"role": "user", "content": "hello", "tokens": 5},)


# --------------------------------------------------------------------------- issue 18 #10: checkpoints are validated
def _bad_checkpoints(s: Session, cp):
    r = dataclasses.replace
    nan_logits = cp.logits.clone()
    nan_logits[0] = float("nan")
    return [
        ("cursor-huge", r(cp, cursor=10 ** 6), r"cp\.cursor"),
        ("cursor-negative", r(cp, cursor=-7), r"cp\.cursor"),
        ("cursor-float", r(cp, cursor=float(cp.cursor)), r"cp\.cursor"),
        ("cursor-beyond-written", r(cp, cursor=s._high + 1), r"cp\.cursor"),
        ("clock-future", r(cp, clock=s._clock + 5), "future"),
        ("clock-negative", r(cp, clock=-1), r"cp\.clock"),
        ("ssm-broadcastable", r(cp, ssm_states=cp.ssm_states[:, :, :1].clone()), r"cp\.ssm_states"),
        ("ssm-scalar", r(cp, ssm_states=torch.tensor(0.0)), r"cp\.ssm_states"),
        ("ssm-f16", r(cp, ssm_states=cp.ssm_states.half()), r"cp\.ssm_states"),
        ("conv-broadcastable", r(cp, conv_states=cp.conv_states[..., :1].clone()), r"cp\.conv_states"),
        ("conv-list", r(cp, conv_states=[0.0]), r"cp\.conv_states"),
        ("logits-nan", r(cp, logits=nan_logits), r"cp\.logits"),
        ("logits-short", r(cp, logits=cp.logits[:-1]), r"cp\.logits"),
        ("transcript-bad", r(cp, transcript=({"role": "u"},)), r"cp\.transcript"),
        ("rng-garbage", r(cp, rng_state=torch.zeros(3, dtype=torch.uint8)), r"cp\.rng_state"),
        ("rng-not-tensor", r(cp, rng_state=b"x"), r"cp\.rng_state"),
    ]


def test_rollback_validates_checkpoints_before_touching_anything(model):
    s = started(model)
    cp = s.checkpoint()
    s.append(" later turn")
    s.generate(3, temperature=1.0)
    before = state(s)
    for label, bad, pattern in _bad_checkpoints(s, cp):
        with pytest.raises(ValueError, match=pattern):
            s.rollback(bad)
        assert_same_state(before, state(s))  # e.g. a bad rng state used to leave the SSM state restored
    s.rollback(cp)  # the real one still works
    assert s.cursor == cp.cursor


# --------------------------------------------------------------------------- sample / record_step (batched decode API)
def test_sample_then_record_step_equals_generate(model):
    a, b = started(model, seed=3), started(model, seed=3)
    want = a.generate(6, temperature=0.9, top_p=0.95)
    for _ in range(6):
        token = b.sample(0.9, 0.95)
        cp = b.checkpoint()
        with torch.no_grad():  # the caller runs the forward (as a batched decode would) ...
            logits = model(torch.tensor([[token]]), b.cache, b.cursor)[0, -1]
        b.record_step(token, logits)  # ... and the session books it
        assert b.cursor == cp.cursor + 1
    assert b.ids[-6:].tolist() == want and torch.equal(a.logits, b.logits)
    before = state(b)
    vocab = model.cfg.vocab_size
    for token, logits, pattern in ((vocab, b.logits, "token"), (-1, b.logits, "token"), (True, b.logits, "token"),
                                   (5, b.logits.double(), "logits"), (5, b.logits[:-1], "logits"),
                                   (5, [0.0], "logits")):
        with pytest.raises(ValueError, match=pattern):
            b.record_step(token, logits)
        assert_same_state(before, state(b))
    full = Session(model, max_len=8, progress=False)
    full.append("1234567")
    with pytest.raises(Exception, match="max_len"):
        full.record_step(5, full.logits)
    assert full.cursor == 7


def test_sample_is_safe_at_tiny_temperatures(model):
    """Issue 18 #7: temperature 1e-40 made logits / T overflow (inf - inf = NaN) and the sampler raise."""
    s = started(model)
    greedy = s.sample(0.0)
    for t in (1e-40, 1e-300, 5e-324):
        assert s.sample(t) == greedy  # all the mass on the argmax
    before = state(s)
    for bad in ({"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": True}, {"top_p": 0.0},
                {"top_p": 1.5}, {"top_p": float("nan")}):
        with pytest.raises(ValueError):
            s.sample(**bad)
        assert_same_state(before, state(s))
    with pytest.raises(SessionError, match="append"):
        Session(model, max_len=8, progress=False).sample(0.5)
