"""`ByteTokenizer`: UTF-8 bytes are tokens 0–255; a few special tokens follow. No vocabulary file, no downloads."""
from __future__ import annotations

import codecs

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                  "<|reserved|>")


class ByteTokenizer:
    """Byte-level tokenizer: ``encode(text)`` gives the UTF-8 bytes; specials have ids 256…263.

    Example::

        tok = ByteTokenizer()
        tok.encode("hé")            # [104, 195, 169]
        tok.decode([104, 195, 169])  # "hé"
    """

    vocab_size = 256 + len(SPECIAL_TOKENS)

    def __init__(self) -> None:
        self.special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.bos_id = self.special["<|bos|>"]
        self.eos_id = self.special["<|eos|>"]
        self.pad_id = self.special["<|pad|>"]

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """UTF-8 bytes of `text` (special-token names in the text are plain bytes), optionally after <|bos|>."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`: byte runs decoded as UTF-8 (invalid bytes → U+FFFD), specials as their names."""
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if not skip_special:
                out.append(self.id_to_token(i))
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        if 0 <= i < 256:
            return bytes([i]).decode("latin-1")
        if 256 <= i < self.vocab_size:
            return SPECIAL_TOKENS[i - 256]
        raise ValueError(f"token id {i}: expected 0 <= id < {self.vocab_size}")

    def token_strings(self, ids) -> list[str]:
        """One short display string per token (for hover text): printable ASCII as is, whitespace escaped,
        other bytes as <0xNN>, specials by name, unknown (-1) as ''."""
        table = {9: "\\t", 10: "\\n", 13: "\\r"}
        out = []
        for i in ids:
            i = int(i)
            if i < 0:
                out.append("")
            elif i in table:
                out.append(table[i])
            elif 32 <= i < 127:
                out.append(chr(i))
            elif i < 256:
                out.append(f"<0x{i:02X}>")
            else:
                out.append(self.id_to_token(i))
        return out

    def stream_decoder(self):
        """A callable ``feed(id) -> str`` for streaming: returns the text completed by this token (multi-byte
        characters appear once their last byte arrives)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(i: int) -> str:
            i = int(i)
            if 0 <= i < 256:
                return decoder.decode(bytes([i]))
            return decoder.decode(b"", final=True) + self.id_to_token(i)
        return feed
