"""Token data for training: documents -> token streams -> fixed-length sequences -> batches.

`TokenData(data_config, seq_len, seed)` reads the corpus (`configs.data.corpus`), tokenizes it
(`configs.data.tokenizer`) and splits it into train and validation **by document**: a document
goes to validation when a keyed hash of its name falls below `validation_fraction`, so its
side never depends on the reading order or on the other documents. Each split is one
token stream (documents joined by the tokenizer's end-of-text token) viewed as sequences
of `seq_len + 1` tokens that overlap by one token: sequence i is
`stream[i*seq_len : i*seq_len + seq_len + 1]`, its input the first `seq_len` tokens and
its target the last `seq_len`, so every token of the stream is predicted exactly once.

Everything is a pure function of (corpus, tokenizer, seq_len, seed): two machines with the
same inputs build the same batches, and `fingerprint` lets them check that they do.
"""

from __future__ import annotations

import hashlib
import math
import operator
from array import array
from collections.abc import Iterator
from functools import cached_property

import numpy as np
import torch

from configs.data.corpus import Document, Progress, describe_source, iter_documents
from configs.data.errors import DataError
from configs.data.split import is_validation_document
from configs.data.tokenizer import Tokenizer, load_tokenizer
from configs.schema import DataConfig, RunConfig

__all__ = ["Batch", "DataError", "TokenData", "is_validation_document"]

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets): int64, shape (batch, seq_len)

_CHUNK_CHARS = 8 << 20  # characters handed to the tokenizer at once
_CHUNK_DOCS = 4096


class TokenData:
    """A tokenized corpus split into train and validation, served as deterministic batches.

    `progress(done_bytes, total_bytes)`, when given, is called while the corpus is read
    and tokenized (input bytes, not tokens), for a status line; nothing here prints.

    The validation split is by document hash (see `is_validation_document`). When that
    leaves validation (or train) shorter than one sequence, the last train documents move
    to validation; when that is not possible either (a single document, or documents too
    few or too short), the joined token stream is cut at its end instead. `split_method`
    says which happened: "hash", "last documents" or "token stream".
    """

    def __init__(
        self,
        data: DataConfig,
        seq_len: int,
        seed: int,
        *,
        progress: Progress | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        seq_len = positive_int("seq_len", seq_len)
        self.config = data
        self.seq_len = seq_len
        self.seed = nonneg_int("seed", seed)
        self._tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data.tokenizer)
        self.source = describe_source(data)
        self._dtype = np.dtype(np.uint16 if self._tokenizer.vocab_size <= 1 << 16 else np.int32)
        self._read(data, progress)

    @classmethod
    def from_run_config(cls, config: RunConfig, *, progress: Progress | None = None) -> TokenData:
        return cls(config.data, config.training.seq_len, config.training.seed, progress=progress)

    # ---- building -------------------------------------------------------------------

    def _read(self, data: DataConfig, progress: Progress | None) -> None:
        train_parts: list[np.ndarray] = []
        val_parts: list[np.ndarray] = []
        train_doc_tokens = array("q")  # tokens (separator included) of each train document
        self.num_documents = 0
        self.num_validation_documents = 0
        self.text_bytes = 0
        pending: list[Document] = []
        pending_chars = 0

        def flush() -> None:
            train_pieces: list[np.ndarray] = []
            val_pieces: list[np.ndarray] = []
            eos = self._tokenizer.eos_id
            separator = np.array([eos] if eos is not None else [], dtype=self._dtype)
            encoded = self._tokenizer.encode_arrays([doc.text for doc in pending])
            for doc, ids in zip(pending, encoded, strict=True):
                self.text_bytes += len(doc.text.encode("utf-8"))
                if is_validation_document(doc.name, data.validation_fraction):
                    val_pieces += (ids, separator)
                    self.num_validation_documents += 1
                else:
                    train_pieces += (ids, separator)
                    train_doc_tokens.append(len(ids) + len(separator))
            for pieces, parts in ((train_pieces, train_parts), (val_pieces, val_parts)):
                if pieces:
                    parts.append(np.concatenate(pieces, dtype=self._dtype, casting="unsafe"))
            pending.clear()

        for doc in iter_documents(data, progress):
            pending.append(doc)
            pending_chars += len(doc.text)
            self.num_documents += 1
            if pending_chars >= _CHUNK_CHARS or len(pending) >= _CHUNK_DOCS:
                flush()
                pending_chars = 0
        if pending:
            flush()
        train = self._join(train_parts)
        val = self._join(val_parts)
        train_parts.clear()  # the joined streams are now the only copies
        val_parts.clear()
        self._train, self._val = self._split(train, val, train_doc_tokens, data.validation_fraction)
        for stream in (self._train, self._val):
            stream.setflags(write=False)

    def _join(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.empty(0, dtype=self._dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _split(
        self, train: np.ndarray, val: np.ndarray, train_doc_tokens: array, fraction: float
    ) -> tuple[np.ndarray, np.ndarray]:
        need = self.seq_len + 1  # tokens in one sequence
        total = len(train) + len(val)
        self.split_method = "hash"
        if len(train) >= need and len(val) >= need:
            return train, val
        if self.num_documents >= 2 and len(train) >= need:
            # Validation is too short: move train documents, last first, until it holds its
            # share, keeping at least one train document and one train sequence.
            target = max(need, math.ceil(fraction * total))
            moved = count = 0
            while (
                len(val) + moved < target
                and count < len(train_doc_tokens) - 1
                and len(train) - moved - train_doc_tokens[-1 - count] >= need
            ):
                moved += train_doc_tokens[-1 - count]
                count += 1
            if len(val) + moved >= need:
                self.split_method = "last documents"
                self.num_validation_documents += count
                cut = len(train) - moved
                return train[:cut], np.concatenate([val, train[cut:]])
        if total < 2 * need:
            raise DataError(
                f"data.paths: {self.source} gives only {total:,} tokens; one train and one validation "
                f"sequence of seq_len+1={need} tokens need at least {2 * need:,}: add text or lower "
                f"training.seq_len"
            )
        self.split_method = "token stream"
        joined = np.concatenate([train, val])
        val_len = max(need, math.ceil(fraction * total))
        return joined[:-val_len], joined[-val_len:]

    # ---- what was built -------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def train_stream(self) -> np.ndarray:
        """The train token stream (read-only; uint16, or int32 for vocabularies over 65,536)."""
        return self._train

    @property
    def validation_stream(self) -> np.ndarray:
        return self._val

    @property
    def train_tokens(self) -> int:
        return len(self._train)

    @property
    def validation_tokens(self) -> int:
        return len(self._val)

    @property
    def num_train_sequences(self) -> int:
        return max(0, (len(self._train) - 1) // self.seq_len)

    @property
    def num_validation_sequences(self) -> int:
        return max(0, (len(self._val) - 1) // self.seq_len)

    @cached_property
    def fingerprint(self) -> str:
        """16 hex digits identifying the tokenized data: equal on two machines iff their streams are."""
        h = hashlib.blake2b(digest_size=8, person=b"swarmtrain-data")
        eos = self._tokenizer.eos_id
        h.update(f"v1 vocab={self._tokenizer.vocab_size} eos={eos} ".encode())
        h.update(f"train={len(self._train)} val={len(self._val)} ".encode())
        little = self._dtype.newbyteorder("<")
        for stream in (self._train, self._val):
            h.update(memoryview(np.ascontiguousarray(stream, dtype=little)).cast("B"))
        return h.hexdigest()

    def describe(self) -> str:
        """One human line, e.g. for a CLI's startup output."""
        split = "" if self.split_method == "hash" else f" (validation split: {self.split_method})"
        return (
            f"corpus: {self.source} ({self.num_documents:,} documents, {_size(self.text_bytes)}) · "
            f"{self._tokenizer.name} tokenizer · {_count(self.train_tokens)} train / "
            f"{_count(self.validation_tokens)} val tokens{split} · fp {self.fingerprint[:8]}"
        )

    def __repr__(self) -> str:
        return f"TokenData({self.describe()})"

    # ---- batches --------------------------------------------------------------------

    def num_shard_sequences(self, shard_index: int, num_shards: int) -> int:
        """Train sequences in shard `shard_index` of `num_shards` (sequence i is in shard i % num_shards)."""
        shard_index, num_shards = check_shard(shard_index, num_shards)
        return max(0, (self.num_train_sequences - shard_index + num_shards - 1) // num_shards)

    def train_batches(
        self, batch_size: int, shard_index: int = 0, num_shards: int = 1, start_step: int = 0
    ) -> Iterator[Batch]:
        """Endless (inputs, targets) batches of this shard's train sequences.

        Sequence i belongs to shard i % num_shards, so shards are disjoint, cover every
        sequence together, and each samples the whole corpus. An epoch visits the shard's
        sequences in an order drawn from (seed, epoch, shard_index); the incomplete last
        batch of an epoch is dropped. `start_step` skips that many batches, computed
        directly: batch k of `train_batches(b, s, n, start_step=j)` is batch j + k of
        `train_batches(b, s, n)`.
        """
        batch_size = positive_int("batch_size", batch_size)
        shard_index, num_shards = check_shard(shard_index, num_shards)
        start_step = nonneg_int("start_step", start_step)
        size = self.num_shard_sequences(shard_index, num_shards)
        if size < batch_size:
            where = f"shard {shard_index} of {num_shards} has" if num_shards > 1 else "the train split has"
            raise DataError(
                f"{where} {size:,} sequences of seq_len+1={self.seq_len + 1} tokens, fewer than "
                f"batch_size={batch_size} (the train split has {self.num_train_sequences:,} in all): "
                f"lower the batch size or the shard count, or add data"
            )
        return self._train_iterator(batch_size, shard_index, num_shards, start_step)

    def _train_iterator(
        self, batch_size: int, shard_index: int, num_shards: int, start_step: int
    ) -> Iterator[Batch]:
        members = np.arange(shard_index, self.num_train_sequences, num_shards, dtype=np.int64)
        steps_per_epoch = len(members) // batch_size
        epoch, first = divmod(start_step, steps_per_epoch)
        while True:
            order = members[self._permutation(epoch, shard_index, len(members))]
            for step in range(first, steps_per_epoch):
                yield self._gather(self._train, order[step * batch_size : (step + 1) * batch_size])
            first = 0
            epoch += 1

    def _permutation(self, epoch: int, shard_index: int, n: int) -> np.ndarray:
        # Sorting the raw PCG64 output: the bit stream is fixed by the algorithm and the
        # seed, so this order does not depend on numpy's sampling code.
        bits = np.random.PCG64(np.random.SeedSequence([self.seed, epoch, shard_index]))
        return np.argsort(bits.random_raw(n), kind="stable")

    def validation_batches(self, batch_size: int, max_batches: int) -> list[Batch]:
        """The same validation batches on every machine (see `validation_ids`)."""
        return [self._gather(self._val, ids)
                for ids in validation_ids(self.num_validation_sequences, batch_size, max_batches)]

    def _gather(self, stream: np.ndarray, sequence_ids: np.ndarray) -> Batch:
        positions = sequence_ids[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        window = torch.from_numpy(stream[positions].astype(np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def validation_ids(n: int, batch_size: int, max_batches: int) -> list[np.ndarray]:
    """The sequences of each validation batch, the same on every machine: full batches spread
    evenly over the `n` validation sequences, or one smaller batch when there are fewer than
    `batch_size` (none when there are none)."""
    batch_size = positive_int("batch_size", batch_size)
    max_batches = positive_int("max_batches", max_batches)
    count = min(max_batches, n // batch_size) * batch_size
    if count == 0:
        return [np.arange(n, dtype=np.int64)] if n else []
    chosen = np.arange(count, dtype=np.int64) * n // count  # distinct, evenly spread
    return [chosen[i : i + batch_size] for i in range(0, count, batch_size)]


def nonneg_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer (got {value!r})")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer (got {value!r})") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (got {value})")
    return value


def positive_int(name: str, value: object) -> int:
    value = nonneg_int(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (got {value})")
    return value


def check_shard(shard_index: object, num_shards: object) -> tuple[int, int]:
    num_shards = positive_int("num_shards", num_shards)
    shard_index = nonneg_int("shard_index", shard_index)
    if shard_index >= num_shards:
        raise ValueError(
            f"shard_index must be in 0..{num_shards - 1} for num_shards={num_shards} (got {shard_index})"
        )
    return shard_index, num_shards


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}K"
    return f"{n:,}"


def _size(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} MB"
    if n >= 1_000:
        return f"{n / 1e3:.1f} KB"
    return f"{n:,} B"
