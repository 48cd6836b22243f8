"""The chat format of the server: how messages become tokens, and how a session's transcript is checked
against its cache.

A conversation is rendered with the byte tokenizer's special tokens::

    <|bos|> <|system|>…<|end|> <|user|>…<|end|> <|assistant|>…<|end|> … <|assistant|>

<|bos|> opens the conversation once; each message is its role token, the UTF-8 bytes of its content and <|end|>;
the trailing <|assistant|> is the generation prompt.

Every message renders on its own, so rendering the whole history and appending "the tokens from current_pos on"
(docs/algorithm.md §6.5) is the same as appending the rendering of the new messages only. Generation stops at any special
token (the model ending its turn), so a reply is pure bytes; the server closes it with <|end|>.

Each transcript message the server stores is ``{"role", "content", "tokens"}``, `tokens` being the length of its
rendering (plus one for <|bos|> on the first message). The cache's token ids are the ground truth: a reply that is
not valid UTF-8 is stored with U+FFFD in `content`, while the cache keeps its exact bytes.
"""
from __future__ import annotations

from ..model.tokenizer import ByteTokenizer

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A message or transcript that the chat format cannot represent (HTTP 400 or 409 in the server)."""


def message_text(message, index: int) -> tuple[str, str]:
    """(role, content) of an OpenAI-style message; content may be a string or a list of text parts."""
    if not isinstance(message, dict):
        raise ChatFormatError(f"messages[{index}]: expected an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role == "developer":  # the newer OpenAI name of the system role
        role = "system"
    if role not in ROLES:
        raise ChatFormatError(f"messages[{index}].role={role!r}: expected one of {list(ROLES)}")
    if content is None:
        content = ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(f"messages[{index}].content[{j}]: only text parts are supported")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ChatFormatError(f"messages[{index}].content: expected a string or a list of text parts")
    return role, content


def render_message(tok: ByteTokenizer, role: str, content: str) -> list[int]:
    """Token ids of one message: role token, UTF-8 bytes, <|end|>."""
    return [tok.special[f"<|{role}|>"]] + tok.encode(content) + [tok.special["<|end|>"]]


def render(tok: ByteTokenizer, messages: list[tuple[str, str]], *, first: bool) -> list[int]:
    """Token ids of `messages` ((role, content) pairs); `first` puts <|bos|> in front (the session is empty)."""
    ids = [tok.bos_id] if first else []
    for role, content in messages:
        ids += render_message(tok, role, content)
    return ids


def generation_prompt(tok: ByteTokenizer) -> list[int]:
    """What opens the assistant's turn."""
    return [tok.special["<|assistant|>"]]


def stop_token_ids(tok: ByteTokenizer) -> list[int]:
    """Every special token ends a reply: the model closing its turn or starting another one."""
    return sorted(tok.special.values())


def transcript_problem(tok: ByteTokenizer, transcript: list[dict], ids: list[int]) -> str | None:
    """Why `transcript` does not describe the cache holding `ids` in this chat format, or None if it does.

    Checks the token count of every message, its role token and its closing <|end|>; a non-empty cache with an
    empty transcript (a session restored without one) is a mismatch.
    """
    if not transcript:
        return None if not ids else f"the cache holds {len(ids)} tokens but the transcript is empty"
    if not ids or ids[0] != tok.bos_id:
        return "the cache does not start with <|bos|>"
    pos = 1
    for i, msg in enumerate(transcript):
        n = msg.get("tokens")
        role = msg.get("role")
        if role not in ROLES or not isinstance(n, int) or isinstance(n, bool):
            return f"transcript message {i} has no valid role/tokens (not written by this server's chat format)"
        n -= 1 if i == 0 else 0
        if n < 2 or pos + n > len(ids):
            return f"transcript message {i} claims {n} tokens at position {pos}, beyond the cache's {len(ids)}"
        if ids[pos] != tok.special[f"<|{role}|>"] or ids[pos + n - 1] != tok.special["<|end|>"]:
            return f"transcript message {i} ({role}) does not match the cache at positions {pos}…{pos + n - 1}"
        pos += n
    if pos != len(ids):
        return f"the transcript covers {pos} tokens but the cache holds {len(ids)}"
    return None
