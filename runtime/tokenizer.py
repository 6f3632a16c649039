"""Text <-> ids with HF `tokenizers` (no transformers). The engine directory ships `tokenizer.json`."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import EngineError, InputError


class TextCodec:
    """Encodes prompts and decodes generated ids with one `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> TextCodec:
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise EngineError(f"cannot read tokenizer {path}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InputError(f"prompt text {text!r} is empty: every prompt needs at least 1 character")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))
