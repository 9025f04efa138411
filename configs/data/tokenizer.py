"""Text <-> token ids: raw UTF-8 bytes, or a local Hugging Face `tokenizer.json`.

`load_tokenizer(spec)` takes `DataConfig.tokenizer`: "bytes" (256 symbols, nothing to
download or train) or the path of a `tokenizer.json` such as GPT-J's. Nothing here reaches
the network.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from configs.data.errors import DataError

__all__ = ["ByteTokenizer", "DataError", "JsonTokenizer", "Tokenizer", "load_tokenizer"]

BYTES_SPEC = "bytes"
END_OF_TEXT = "<|endoftext|>"


class Tokenizer(ABC):
    """What the data pipeline needs from a tokenizer.

    `eos_id` is the token placed between documents, or None when the tokenizer has none
    (documents are then simply concatenated).
    """

    name: str
    vocab_size: int
    eos_id: int | None
    fingerprint: str  # the same on every machine iff texts encode the same: prepared data records it

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; byte sequences that are not valid UTF-8 decode to U+FFFD."""

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_batch` as one integer array per text: the bulk path of the data pipeline."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: vocabulary 256, lossless for any text.

    Byte 0 (NUL) separates documents: it essentially never occurs in text or source code,
    so it marks a boundary without stealing a symbol that text needs, and keeps the
    vocabulary at exactly 256.
    """

    name = "bytes"
    vocab_size = 256
    eos_id = 0
    fingerprint = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        try:
            raw = bytes(ids)
        except ValueError:
            bad = next(i for i in ids if not 0 <= int(i) < 256)
            raise ValueError(f"byte tokenizer: id {bad} is outside 0..255") from None
        return raw.decode("utf-8", errors="replace")


class JsonTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer read from a local `tokenizer.json` file."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise DataError(
                f"data.tokenizer: {path} does not exist; point it at a local tokenizer.json "
                f'(for GPT-J, the tokenizer.json of its model repository) or use "{BYTES_SPEC}"'
            )
        try:
            inner = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception subclasses for bad files
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(
                f"data.tokenizer: {path} could not be read as a tokenizer.json ({reason}); "
                f'point it at a valid tokenizer.json or use "{BYTES_SPEC}"'
            ) from None
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        inner.no_truncation()
        inner.no_padding()
        self._inner = inner
        self.path = path
        self.name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
        self.vocab_size = inner.get_vocab_size(with_added_tokens=True)
        self.eos_id = inner.token_to_id(END_OF_TEXT)

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encode = getattr(self._inner, "encode_batch_fast", self._inner.encode_batch)
        return [enc.ids for enc in encode(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._inner.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """`DataConfig.tokenizer` -> a tokenizer: "bytes", or a path to a local tokenizer.json."""
    if spec == BYTES_SPEC:
        return ByteTokenizer()
    return JsonTokenizer(spec)
