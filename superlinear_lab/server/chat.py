"""The server's chat rules: how messages become tokens, how reply tokens become text, and how a session's
transcript is checked against its cache. `chat_rules(tokenizer)` picks one of three, and the engine and the routes
use only the `ChatRules` interface, so every formatting decision lives in this module.

* `ByteChat` — the project's own byte-level models (`ByteTokenizer`). A conversation is::

      <|bos|> <|system|>…<|end|> <|user|>…<|end|> <|assistant|>…<|end|> … <|assistant|>

  <|bos|> opens the conversation once; each message is its role token, the UTF-8 bytes of its content and <|end|>;
  the trailing <|assistant|> is the generation prompt. Generation stops at any special token; the server closes the
  reply with <|end|>.

* `TemplateChat` — a transformers tokenizer with a chat template (its own ``tokenizer.chat_template``, or one the
  user gives: ``serve --chat-template FILE``). The template renders the conversation as text
  (``tokenizer.apply_chat_template(..., tokenize=False)``); each message's tokens are the tokens of the text it adds
  to the rendering of the messages before it, and the generation prompt is the text that
  ``add_generation_prompt=True`` adds. The tokens that close an assistant turn (e.g. ``<|im_end|>\\n``) are the text
  the template puts after an assistant message's content. Generation stops at the tokenizer's and the model's
  end-of-sequence ids and at the first token of that closing text when it is a special token. A template that
  does not render a conversation as an extension of its earlier part (say, one that moves the system prompt into
  the last user message) is refused with a `ChatFormatError` naming the step that failed.

* `NoChat` — a tokenizer without a chat template (or a model without a tokenizer): chat requests are refused with
  a `ChatFormatError` that says what to pass; completions work (stopping at end-of-sequence).

Every message renders as its own tokens, so rendering the whole history and appending "the tokens from current_pos
on" (docs/algorithm.md §6.5) is the same as appending the rendering of the new messages only; a stateless chat is a
session's first turn. Each transcript message the server stores is ``{"role", "content", "tokens"}``, `tokens` being
the length of its rendering (an assistant message counts its generation prompt, its reply and its closing tokens).
The cache's token ids are the ground truth: a reply that is not valid UTF-8 is stored with U+FFFD in `content`,
while the cache keeps its exact tokens.
"""
from __future__ import annotations

import logging

from ..model.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_PLACEHOLDER = "SUPERLINEARLABREPLYPLACEHOLDER"  # an assistant content no template alters (no spaces, no markup)


class ChatFormatError(ValueError):
    """A message, transcript or chat template that the chat rules cannot represent (HTTP 400 or 409 in the
    server)."""


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


class Turn:
    """The tokens a chat turn appends: `ids` = the new messages' tokens, then the generation prompt.

    counts[i]: tokens of new message i (the transcript's ``tokens``); prompt: tokens of the generation prompt
    (counted with the assistant's reply); close: the tokens that end the assistant's turn after its reply.
    """

    def __init__(self, ids: list[int], counts: list[int], prompt: int, close: list[int]):
        self.ids, self.counts, self.prompt, self.close = ids, counts, prompt, close


class ChatRules:
    """What the server needs to know about a tokenizer (see the module docstring).

    Subclasses implement `turn` and `transcript_problem` (chat) and `decode`/`encode`/`token_text`/`token_bytes`
    (text); `stop_ids` are the tokens that end a reply.
    """

    kind = ""  # "byte", "template" or "none" (GET /v1/server's chat_format)
    chat_error: str | None = None  # why chat is refused (NoChat), None when chat works
    stop_ids: frozenset = frozenset()

    def turn(self, history: list[tuple[str, str]], new: list[tuple[str, str]]) -> Turn:
        """The tokens that append `new` ((role, content) pairs) to a session whose transcript is `history`
        (empty: a new conversation) and open the assistant's reply."""
        raise NotImplementedError

    def transcript_problem(self, transcript: list[dict], ids: list[int]) -> str | None:
        """Why `transcript` does not describe the cache holding `ids` under these rules, or None if it does.
        A non-empty cache with an empty transcript (a session restored without one) is a mismatch."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of reply tokens (an incomplete UTF-8 sequence at the end decodes as U+FFFD)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Tokens of `text` inside a reply (no special tokens added)."""
        raise NotImplementedError

    def prompt_ids(self, text: str) -> list[int]:
        """Tokens of a completion prompt: a document start (the tokenizer's BOS where it adds one), then `text`."""
        raise NotImplementedError

    def token_text(self, token: int) -> str:
        """One token as text, for logprobs."""
        raise NotImplementedError

    def token_bytes(self, token: int) -> list[int]:
        """The UTF-8 bytes of one token, for chat logprobs."""
        raise NotImplementedError

    @staticmethod
    def _common_problem(transcript: list[dict], ids: list[int]) -> str | None:
        if not transcript:
            return None if not ids else f"the cache holds {len(ids)} tokens but the transcript is empty"
        for i, msg in enumerate(transcript):
            n = msg.get("tokens")
            if msg.get("role") not in ROLES or not isinstance(n, int) or isinstance(n, bool) \
                    or not isinstance(msg.get("content"), str):
                return f"transcript message {i} has no valid role/content/tokens (not written by this server's chat " \
                       "format)"
        total = sum(m["tokens"] for m in transcript)
        if total != len(ids):
            return f"the transcript covers {total} tokens but the cache holds {len(ids)}"
        return None


# --------------------------------------------------------------------------- byte-level models
class ByteChat(ChatRules):
    """The byte tokenizer's chat format (module docstring)."""

    kind = "byte"

    def __init__(self, tok: ByteTokenizer):
        self.tok = tok
        self.stop_ids = frozenset(tok.special.values())  # any special token ends a reply

    def render_message(self, role: str, content: str) -> list[int]:
        """Token ids of one message: role token, UTF-8 bytes, <|end|>."""
        return [self.tok.special[f"<|{role}|>"]] + self.tok.encode(content) + [self.tok.special["<|end|>"]]

    def turn(self, history, new):
        ids = [] if history else [self.tok.bos_id]
        counts = []
        for i, (role, content) in enumerate(new):
            rendered = self.render_message(role, content)
            counts.append(len(rendered) + (1 if i == 0 and not history else 0))
            ids += rendered
        return Turn(ids + [self.tok.special["<|assistant|>"]], counts, 1, [self.tok.special["<|end|>"]])

    def transcript_problem(self, transcript, ids):
        """Also checks that the cache starts with <|bos|> and every message with its role token and ends with
        <|end|>."""
        if not transcript:
            return self._common_problem(transcript, ids)
        if not ids or ids[0] != self.tok.bos_id:
            return "the cache does not start with <|bos|>"
        pos = 1
        for i, msg in enumerate(transcript):
            n, role = msg.get("tokens"), msg.get("role")
            if role not in ROLES or not isinstance(n, int) or isinstance(n, bool):
                return f"transcript message {i} has no valid role/tokens (not written by this server's chat format)"
            n -= 1 if i == 0 else 0
            if n < 2 or pos + n > len(ids):
                return f"transcript message {i} claims {n} tokens at position {pos}, beyond the cache's {len(ids)}"
            if ids[pos] != self.tok.special[f"<|{role}|>"] or ids[pos + n - 1] != self.tok.special["<|end|>"]:
                return f"transcript message {i} ({role}) does not match the cache at positions {pos}…{pos + n - 1}"
            pos += n
        if pos != len(ids):
            return f"the transcript covers {pos} tokens but the cache holds {len(ids)}"
        return None

    def decode(self, ids):
        if all(0 <= i < 256 for i in ids):  # a reply (no special token): its bytes, fast
            return bytes(ids).decode("utf-8", errors="replace")
        return self.tok.decode(ids)

    def encode(self, text):
        return self.tok.encode(text)

    def prompt_ids(self, text):
        return self.tok.encode(text, bos=True)

    def token_text(self, token):
        """The character of an ASCII byte, ``bytes:\\xNN`` for other bytes, a special's name."""
        if token < 128:
            return chr(token)
        if token < 256:
            return f"bytes:\\x{token:02x}"
        return self.tok.decode([token])

    def token_bytes(self, token):
        return [token] if token < 256 else list(self.tok.decode([token]).encode("utf-8"))


# --------------------------------------------------------------------------- transformers tokenizers
class _HFText(ChatRules):
    """Text side of a transformers tokenizer (`superlinear_lab.hf.model.HFTokenizer`)."""

    def __init__(self, tokenizer):
        self.wrapper = tokenizer
        self.tok = tokenizer.tok
        self.stop_ids = frozenset(tokenizer.eos_ids)
        self._specials = frozenset(self.tok.all_special_ids)
        self._byte_level: bool | None = None  # found out on first use

    def decode(self, ids):
        # no clean-up of tokenization spaces: the text of a prefix of the reply stays a prefix of its text
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode(self, text):
        return list(self.tok.encode(text, add_special_tokens=False)) if text else []

    def prompt_ids(self, text):
        return self.wrapper.encode(text, bos=True)

    def token_bytes(self, token):
        """The token's own bytes: through the byte-level alphabet for a byte-level BPE (so a token holding part of
        a character has its bytes), else the UTF-8 of its text."""
        if self._byte_level is None:
            decoder = getattr(getattr(self.tok, "backend_tokenizer", None), "decoder", None)
            self._byte_level = type(decoder).__name__ == "ByteLevel"
        if self._byte_level and token not in self._specials:
            piece = self.tok.convert_ids_to_tokens(int(token))
            if isinstance(piece, str) and piece and all(c in _BYTE_OF_CHAR for c in piece):
                return [_BYTE_OF_CHAR[c] for c in piece]
        return list(self.decode([token]).encode("utf-8"))

    def token_text(self, token):
        """The token's text, or ``bytes:\\xNN…`` when its bytes are not whole UTF-8 characters (OpenAI's
        notation), so that different tokens never share a text."""
        raw = bytes(self.token_bytes(token))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level BPE alphabet (GPT-2's): printable Latin-1 bytes stand for themselves,
    the other bytes for the characters from U+0100 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_OF_CHAR = _byte_level_alphabet()


class _IdText(ChatRules):
    """Text side of a model without a tokenizer (`superlinear_lab.hf.model.IdTokenizer`): ids only."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.stop_ids = frozenset() if tokenizer.eos_id < 0 else frozenset({tokenizer.eos_id})

    def decode(self, ids):
        return self.tok.decode(ids)

    def encode(self, text):
        return self.tok.encode(text)  # a ValueError saying that there is no tokenizer

    def prompt_ids(self, text):
        return self.tok.encode(text, bos=True)

    def token_text(self, token):
        return self.tok.decode([token])

    def token_bytes(self, token):
        return list(self.token_text(token).encode("utf-8"))


class NoChat(ChatRules):
    """Completions only (module docstring): `text` gives the text side, `reason` is the error chat requests get."""

    kind = "none"

    def __init__(self, text: ChatRules, reason: str):
        self.text, self.chat_error, self.stop_ids = text, reason, text.stop_ids

    def turn(self, history, new):
        raise ChatFormatError(self.chat_error)

    def transcript_problem(self, transcript, ids):
        if transcript:
            return f"a transcript cannot be checked: {self.chat_error}"
        return self._common_problem(transcript, ids)

    def decode(self, ids):
        return self.text.decode(ids)

    def encode(self, text):
        return self.text.encode(text)

    def prompt_ids(self, text):
        return self.text.prompt_ids(text)

    def token_text(self, token):
        return self.text.token_text(token)

    def token_bytes(self, token):
        return self.text.token_bytes(token)


class TemplateChat(_HFText):
    """A transformers tokenizer's chat template (module docstring).

    Args:
        tokenizer: an `HFTokenizer` (its ``tok`` is the transformers tokenizer).
        template: a Jinja chat template overriding the tokenizer's own (None: ``tok.chat_template``).
    """

    kind = "template"

    def __init__(self, tokenizer, template: str | None = None):
        super().__init__(tokenizer)
        self.template = template if template is not None else self.tok.chat_template
        if not isinstance(self.template, str) or not self.template.strip():
            raise ChatFormatError("chat template: expected a non-empty Jinja template")
        # a probe conversation: the template must extend a session turn by turn and close a reply
        first = self.turn([("user", "Hello"), ("assistant", "Hi")], [("user", "Bye")]).close[:1]
        if first and first[0] in set(self.tok.all_special_ids):  # e.g. <|im_end|>: the model ending its turn
            self.stop_ids = self.stop_ids | frozenset(first)

    def render(self, messages: list[tuple[str, str]], generation_prompt: bool = False) -> str:
        """The template's text of `messages` (an empty conversation without a generation prompt is "")."""
        if not messages and not generation_prompt:
            return ""
        try:
            return self.tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                chat_template=self.template, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja errors, raise_exception() in the template
            raise ChatFormatError(f"the chat template cannot render this conversation "
                                  f"({type(e).__name__}: {e})") from None

    @staticmethod
    def _extension(before: str, after: str, what: str) -> str:
        if not after.startswith(before):
            raise ChatFormatError(f"the chat template does not render {what} as an extension of the conversation "
                                  "before it, so a session cannot append it (this template is not supported for "
                                  "chat; pass another one with --chat-template or use /v1/completions)")
        return after[len(before):]

    def _segments(self, history, new) -> tuple[list[str], str]:
        """Texts that messages `new` add after `history`, and the text the generation prompt adds after them."""
        texts, before = [], self.render(history)
        for i in range(len(new)):
            after = self.render(list(history) + list(new[: i + 1]))
            texts.append(self._extension(before, after, f"message {len(history) + i} ({new[i][0]})"))
            before = after
        prompt = self._extension(before, self.render(list(history) + list(new), True), "the generation prompt")
        return texts, prompt

    def _close(self, history) -> str:
        """Text the template puts after an assistant reply's content, the reply opened by the generation prompt
        after `history`."""
        opened = self.render(history, True)
        full = self.render(list(history) + [("assistant", _PLACEHOLDER)])
        cut = full.find(_PLACEHOLDER)
        if cut < 0 or full[:cut] != opened:
            raise ChatFormatError("the chat template renders an assistant message differently from its generation "
                                  "prompt followed by the reply, so a reply cannot be closed in the cache (pass "
                                  "another template with --chat-template or use /v1/completions)")
        return full[cut + len(_PLACEHOLDER):]

    def turn(self, history, new):
        texts, prompt = self._segments(history, new)
        pieces = [self.encode(t) for t in texts]
        prompt_ids = self.encode(prompt)
        ids = [t for p in pieces for t in p] + prompt_ids
        return Turn(ids, [len(p) for p in pieces], len(prompt_ids),
                    self.encode(self._close(list(history) + list(new))))

    def transcript_problem(self, transcript, ids):
        """Also checks every user/system message's tokens exactly, and that every assistant message starts with
        the generation prompt and ends with the closing tokens."""
        problem = self._common_problem(transcript, ids)
        if problem or not transcript:
            return problem
        messages = [(m["role"], m["content"]) for m in transcript]
        pos = 0
        try:
            for i, (role, content) in enumerate(messages):
                n = transcript[i]["tokens"]
                got = ids[pos: pos + n]
                if role == "assistant":
                    turn = self.turn(messages[:i], [])
                    head, tail = turn.ids, turn.close
                    ok = n >= len(head) + len(tail) and got[: len(head)] == head \
                        and got[len(got) - len(tail):] == tail
                else:
                    ok = got == self.encode(self._segments(messages[:i], [messages[i]])[0][0])
                if not ok:
                    return f"transcript message {i} ({role}) does not match the cache at positions {pos}…{pos + n - 1}"
                pos += n
        except ChatFormatError as e:
            return str(e)
        return None


def chat_rules(tokenizer, chat_template: str | None = None) -> ChatRules:
    """The rules for a served model's tokenizer: `ByteChat` for a `ByteTokenizer`; for a transformers tokenizer
    (`HFTokenizer`) `TemplateChat` with `chat_template` (a Jinja string) or its own template; `NoChat` when it has
    none, when its own template cannot be used (logged), or for a model without a tokenizer.

    Raises:
        ValueError: a `chat_template` for a byte tokenizer or a model without a tokenizer.
        ChatFormatError: a `chat_template` that cannot be used (the reason is in the message).
    """
    if isinstance(tokenizer, ByteTokenizer):
        if chat_template is not None:
            raise ValueError("chat_template: this model uses the byte tokenizer's own chat format; a Jinja template "
                             "applies only to a transformers tokenizer")
        return ByteChat(tokenizer)
    if not hasattr(tokenizer, "tok"):
        if chat_template is not None:
            raise ValueError("chat_template: this model has no tokenizer to apply a chat template with")
        return NoChat(_IdText(tokenizer), "this model has no tokenizer, so it cannot chat; send token ids to "
                                          "/v1/completions")
    if chat_template is not None:
        return TemplateChat(tokenizer, chat_template)
    if not getattr(tokenizer.tok, "chat_template", None):
        return NoChat(_HFText(tokenizer), "this model's tokenizer has no chat template (tokenizer.chat_template is "
                                          "not set), so the server cannot format a chat; start it with "
                                          "--chat-template FILE (a Jinja template) or use /v1/completions")
    try:
        return TemplateChat(tokenizer)
    except ChatFormatError as e:
        log.warning("chat is off: the tokenizer's chat template cannot be used: %s", e)
        return NoChat(_HFText(tokenizer), f"the tokenizer's chat template cannot be used: {e}")
