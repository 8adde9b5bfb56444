"""Token counting for prompt budgets: any HF tokenizer, or the tiny whitespace stand-in used in tests."""

from __future__ import annotations

import re
import zlib
from typing import Any

_PIECES = re.compile(r"\S+")


class WhitespaceTokenizer:
    """A model-free stand-in: one token per whitespace-separated piece. Deterministic, for tests and for budgets
    when no real tokenizer is at hand."""

    name = "whitespace"
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED), ids must not change between runs
        return [zlib.crc32(p.encode("utf-8")) & 0xFFFF for p in _PIECES.findall(text)]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens `tokenizer` makes of `text` without special tokens (the chat form carries its own)."""
    if hasattr(tokenizer, "encode"):
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return len(tokenizer.encode(text))
    if callable(tokenizer):
        return len(tokenizer(text)["input_ids"])
    raise TypeError(f"cannot count tokens with {type(tokenizer).__name__}: it has neither encode() nor __call__")
