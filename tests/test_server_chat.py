"""The server's chat format (no server, no model): rendering, message parsing and the transcript/cache check."""
from __future__ import annotations

import pytest

from superlinear_lab.model import ByteTokenizer
from superlinear_lab.server.chat import ByteChat, ChatFormatError, chat_rules, message_text

TOK = ByteTokenizer()
RULES = ByteChat(TOK)


def transcript_of(messages):
    """What the server stores for `messages` rendered into an empty session."""
    out = []
    for i, (role, content) in enumerate(messages):
        out.append({"role": role, "content": content,
                    "tokens": len(RULES.render_message(role, content)) + (i == 0)})
    return out


def render(messages, first):
    """The messages' tokens without the generation prompt."""
    return RULES.turn([] if first else [("user", "earlier")], messages).ids[:-1]


def test_render_is_per_message_so_deltas_equal_the_full_rendering():
    history = [("system", "be brief"), ("user", "héllo"), ("assistant", "hi")]
    delta = [("user", "again")]
    assert render(history + delta, first=True) == render(history, first=True) + render(delta, first=False)
    turn = RULES.turn([], [("user", "é")])
    assert turn.ids == [TOK.bos_id, TOK.special["<|user|>"], 0xC3, 0xA9, TOK.special["<|end|>"],
                        TOK.special["<|assistant|>"]]
    assert turn.counts == [5] and turn.prompt == 1 and turn.close == [TOK.special["<|end|>"]]
    assert set(RULES.stop_ids) == set(range(256, TOK.vocab_size))
    assert isinstance(chat_rules(TOK), ByteChat)
    with pytest.raises(ValueError, match="chat_template"):
        chat_rules(TOK, "{{ messages }}")


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
    ids = render(messages, first=True)
    transcript = transcript_of(messages)
    assert RULES.transcript_problem(transcript, ids) is None
    assert RULES.transcript_problem([], []) is None
    assert "transcript is empty" in RULES.transcript_problem([], ids)
    assert "covers" in RULES.transcript_problem(transcript[:2], ids)
    assert "beyond" in RULES.transcript_problem(transcript + transcript_of([("user", "more")]), ids)
    wrong_role = [dict(m) for m in transcript]
    wrong_role[1]["role"] = "assistant"
    assert "does not match" in RULES.transcript_problem(wrong_role, ids)
    library = [{"role": "user", "content": "question"}]  # written by Session.append, no token count
    assert "not written by this server" in RULES.transcript_problem(library, ids)
    assert "<|bos|>" in RULES.transcript_problem(transcript, ids[1:])
