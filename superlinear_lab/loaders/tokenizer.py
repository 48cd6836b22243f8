"""Tokenizers for loaded checkpoints, with the interface `Session` and `RoutingTrace` use
(``encode``, ``decode``, ``token_strings``, ``eos_id``, ``vocab_size``).

* `CheckpointTokenizer` reads ``tokenizer.json`` with the `tokenizers` library (a JSON description run by Rust
  code shipped in the wheel; nothing from the checkpoint is executed).
* `IdTokenizer` is used when a checkpoint has no ``tokenizer.json``: ids in, ids out — `encode` refuses text.
"""
from __future__ import annotations

from pathlib import Path


class CheckpointTokenizer:
    """``tokenizer.json`` of a checkpoint. ``encode(text)`` -> ids; ``decode(ids)`` -> text.

    Args:
        path: the ``tokenizer.json`` file.
        eos_id: end-of-sequence id (config.json's ``eos_token_id``); None: the tokenizer's ``</s>``,
            ``<|im_end|>`` or ``<|endoftext|>`` if present, else -1 (never matches).
    """

    def __init__(self, path, eos_id: int | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            eos_id = next((i for t in ("</s>", "<|im_end|>", "<|endoftext|>")
                           if (i := self._tok.token_to_id(t)) is not None), -1)
        self.eos_id = eos_id

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text` (no special tokens added; `bos` is accepted for interface parity and ignored)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_strings(self, ids) -> list[str]:
        """One display string per id ('' for -1 or unknown ids)."""
        out = []
        for i in ids:
            i = int(i)
            out.append("" if i < 0 else (self._tok.id_to_token(i) or ""))
        return out


def byte_level_tokenizer_json(eos_token: str = "</s>") -> str:
    """``tokenizer.json`` text of a byte-level tokenizer (256 byte tokens, then `eos_token` at id 256) — for
    tiny demo and test checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {eos_token: len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([eos_token])
    return tok.to_str()


class IdTokenizer:
    """Stand-in for checkpoints without ``tokenizer.json``: sessions take token ids; text is refused."""

    def __init__(self, vocab_size: int, eos_id: int | None = None):
        self.vocab_size = vocab_size
        self.eos_id = -1 if eos_id is None else eos_id

    def encode(self, text: str, bos: bool = False) -> list[int]:
        raise ValueError("this checkpoint has no tokenizer.json: pass token ids instead of text")

    def decode(self, ids, skip_special: bool = False) -> str:
        return " ".join(f"<{int(i)}>" for i in ids)

    def token_strings(self, ids) -> list[str]:
        return ["" if int(i) < 0 else f"<{int(i)}>" for i in ids]
