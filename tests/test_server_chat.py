"""The server's chat format (no server, no model): rendering, message parsing and the transcript/cache check."""
from __future__ import annotations

import pytest

from superlinear_lab.model import ByteTokenizer
from superlinear_lab.server.chat import (ChatFormatError, generation_prompt, message_text, render, render_message,
                                         stop_token_ids, transcript_problem)

TOK = ByteTokenizer()


def transcript_of(messages):
    """What the server stores for `messages` rendered into an empty session."""
    out = []
    for i, (role, content) in enumerate(messages):
        out.append({"role": role, "content": content, "tokens": len(render_message(TOK, role, content)) + (i == 0)})
    return out


def test_render_is_per_message_so_deltas_equal_the_full_rendering():
    history = [("system", "be brief"), ("user", "héllo"), ("assistant", "hi")]
    delta = [("user", "again")]
    assert render(TOK, history + delta, first=True) == render(TOK, history, first=True) + render(TOK, delta,
                                                                                                 first=False)
    ids = render(TOK, [("user", "é")], first=True)
    assert ids == [TOK.bos_id, TOK.special["<|user|>"], 0xC3, 0xA9, TOK.special["<|end|>"]]
    assert generation_prompt(TOK) == [TOK.special["<|assistant|>"]]
    assert set(stop_token_ids(TOK)) == set(range(256, TOK.vocab_size))


def test_message_text_accepts_openai_shapes():
    assert message_text({"role": "user", "content": "x"}, 0) == ("user", "x")
    assert message_text({"role": "developer", "content": "rules"}, 0) == ("system", "rules")
    assert message_text({"role": "assistant", "content": None}, 0) == ("assistant", "")
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert message_text({"role": "user", "content": parts}, 0) == ("user", "ab")
    for bad in ({"role": "tool", "content": "x"}, {"role": "user", "content": [{"type": "image_url"}]},
                {"role": "user", "content": 3}, "user: x"):
        with pytest.raises(ChatFormatError, match=r"messages\[2\]"):
            message_text(bad, 2)


def test_transcript_problem_accepts_exactly_the_rendered_cache():
    messages = [("system", "s"), ("user", "question"), ("assistant", "answer")]
    ids = render(TOK, messages, first=True)
    transcript = transcript_of(messages)
    assert transcript_problem(TOK, transcript, ids) is None
    assert transcript_problem(TOK, [], []) is None
    assert "transcript is empty" in transcript_problem(TOK, [], ids)
    assert "covers" in transcript_problem(TOK, transcript[:2], ids)
    assert "beyond" in transcript_problem(TOK, transcript + transcript_of([("user", "more")]), ids)
    wrong_role = [dict(m) for m in transcript]
    wrong_role[1]["role"] = "assistant"
    assert "does not match" in transcript_problem(TOK, wrong_role, ids)
    library = [{"role": "user", "content": "question"}]  # written by Session.append, no token count
    assert "not written by this server" in transcript_problem(TOK, library, ids)
    assert "<|bos|>" in transcript_problem(TOK, transcript, ids[1:])
