"""Prepared token shards, memory-mapped, served as the same batches `TokenData` serves.

`PreparedData(data_config, seq_len, seed)` opens the manifest of `data.prepared`, checks it
against the config's tokenizer, and maps each shard with `numpy.memmap`: start-up reads the
manifest and the tokenizer, never the tokens, so its time and memory do not grow with the
corpus. The operating system pages in what the batches touch.

Sequences do not cross shards: sequence j of a shard is its tokens `[j*seq_len, j*seq_len +
seq_len + 1)`, and the split's sequences are numbered shard after shard (a few hundred tokens
per 128 MB shard go unused). In a swarm the coordinator hands out positions of an epoch's order
(`batches_at`, worker/data/epoch_order.py); alone, replica shard `s` of `n` trains sequences
`s, s+n, s+2n, ...`, each epoch in an order drawn per position (`configs.data.permutation`), so
no index of the split is ever held in memory.

With a `ShardFetch` (worker/data/shard_cache.py) the shards come over HTTP into a local cache:
only those the handed-out ranges need, fetched ahead while the worker trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from configs.data.errors import DataError
from configs.data.permutation import SeededPermutation
from configs.data.shards import Manifest, read_manifest
from configs.data.tokenizer import Tokenizer, load_tokenizer
from configs.schema import DataConfig
from worker.data.epoch_order import EpochOrder
from worker.data.shard_cache import ShardFetch
from worker.data.tokens import Batch, check_shard, nonneg_int, positive_int, validation_ids

__all__ = ["PreparedData"]


class _Split:
    """One split's shards as memory maps, addressed by a sequence number across them all. With a
    `fetch`, a shard is mapped once it has been fetched; without, every shard must be here."""

    def __init__(self, directory: Path, manifest: Manifest, split: str, seq_len: int,
                 fetch: ShardFetch | None = None) -> None:
        self.dtype = np.dtype("<u2" if manifest.dtype == "uint16" else "<u4")
        self.shards, self.fetch, self.seq_len = manifest.shards(split), fetch, seq_len
        self.counts = manifest.sequences(split, seq_len)
        self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.maps: list[np.ndarray | None] = [None] * len(self.shards)
        if fetch is None:
            for i in range(len(self.shards)):
                self.maps[i] = self._map(i, directory / self.shards[i].name, directory)
        else:
            fetch.on_evict.append(self._forget)

    def _forget(self, name: str) -> None:
        """The cache dropped this shard: let its map go (fetched again if ever needed)."""
        for i, shard in enumerate(self.shards):
            if shard.name == name:
                self.maps[i] = None

    def _map(self, index: int, path: Path, directory: Path) -> np.ndarray:
        shard = self.shards[index]
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"data.prepared: {path} is missing: copy the whole prepared directory, or "
                            "prepare it again") from None
        if size != shard.tokens * self.dtype.itemsize:
            raise DataError(f"data.prepared: {path} holds {size:,} bytes, not the manifest's "
                            f"{shard.tokens * self.dtype.itemsize:,}: copy it again (coordinator data verify "
                            f"{directory} checks every shard)")
        return np.memmap(path, dtype=self.dtype, mode="r") if shard.tokens else np.empty(0, self.dtype)

    def here(self, index: int, wait: bool = False) -> bool:
        """Whether shard `index` is mapped, mapping it if it has been fetched (fetching it now when `wait`)."""
        if self.maps[index] is None and self.fetch is not None:
            name = self.shards[index].name
            path = self.fetch.fetch_now(name) if wait else self.fetch.path(name)
            if path is not None:
                self.maps[index] = self._map(index, path, self.fetch.directory)
        return self.maps[index] is not None

    @property
    def sequences(self) -> int:
        return int(self.starts[-1])

    def gather(self, ids: np.ndarray) -> Batch:
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        rows = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for row, (shard, sequence) in enumerate(zip(shard_of, ids, strict=True)):
            tokens = None
            while tokens is None:  # an eviction between the two lines only means fetching again
                self.here(int(shard), wait=True)
                tokens = self.maps[shard]
            start = (int(sequence) - int(self.starts[shard])) * self.seq_len
            rows[row] = tokens[start : start + self.seq_len + 1]
        window = torch.from_numpy(rows)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class PreparedData:
    """`data.prepared`'s shards: train and validation batches, like `TokenData`'s."""

    split_method = "prepared"

    def __init__(self, data: DataConfig, seq_len: int, seed: int, *, tokenizer: Tokenizer | None = None,
                 fetch: ShardFetch | None = None) -> None:
        assert data.prepared is not None or fetch is not None
        self.seq_len = positive_int("seq_len", seq_len)
        self.seed = nonneg_int("seed", seed)
        self.fetch = fetch
        self.directory = fetch.directory if fetch is not None else Path(data.prepared or "").expanduser()
        self.manifest = fetch.manifest if fetch is not None else read_manifest(self.directory)
        self._tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data.tokenizer)
        if self.manifest.tokenizer_fingerprint != self._tokenizer.fingerprint:
            raise DataError(f"data.prepared: {self.directory} was prepared with the {self.manifest.tokenizer} "
                            f"tokenizer, not data.tokenizer={data.tokenizer}: set data.tokenizer to the one it "
                            "was prepared with, or prepare the data again")
        self._train = _Split(self.directory, self.manifest, "train", self.seq_len, fetch)
        self._val = _Split(self.directory, self.manifest, "validation", self.seq_len, fetch)
        self._orders: dict[int, EpochOrder] = {}
        for name, split in (("train", self._train), ("validation", self._val)):
            if split.sequences < 1:
                raise DataError(f"data.prepared: the {name} split of {self.directory} has no sequence of "
                                f"seq_len+1={self.seq_len + 1} tokens: lower training.seq_len or prepare more text")

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def num_train_sequences(self) -> int:
        return self._train.sequences

    @property
    def num_validation_sequences(self) -> int:
        return self._val.sequences

    def describe(self) -> str:
        m = self.manifest
        return (f"prepared: {self.directory} ({m.source}, {m.documents:,} documents, "
                f"{len(m.train) + len(m.validation)} shards) · {m.tokenizer} tokenizer · "
                f"{m.tokens('train'):,} train / {m.tokens('validation'):,} val tokens · fp {self.fingerprint[:8]}")

    def num_shard_sequences(self, shard_index: int, num_shards: int) -> int:
        shard_index, num_shards = check_shard(shard_index, num_shards)
        return max(0, (self.num_train_sequences - shard_index + num_shards - 1) // num_shards)

    def train_batches(self, batch_size: int, shard_index: int = 0, num_shards: int = 1,
                      start_step: int = 0) -> Iterator[Batch]:
        """Endless batches of replica shard `shard_index` of `num_shards`, from batch `start_step`
        (as `TokenData.train_batches`: batch k from `start_step=j` is batch j + k from 0)."""
        batch_size = positive_int("batch_size", batch_size)
        shard_index, num_shards = check_shard(shard_index, num_shards)
        start_step = nonneg_int("start_step", start_step)
        size = self.num_shard_sequences(shard_index, num_shards)
        if size < batch_size:
            raise DataError(f"shard {shard_index} of {num_shards} of {self.directory} has {size:,} sequences, fewer "
                            f"than batch_size={batch_size}: lower the batch size or the shard count, or add data")
        return self._iterate(batch_size, shard_index, num_shards, start_step, size)

    def _iterate(self, batch_size: int, shard_index: int, num_shards: int, start_step: int,
                 size: int) -> Iterator[Batch]:
        steps_per_epoch = size // batch_size
        epoch, step = divmod(start_step, steps_per_epoch)
        while True:
            order = SeededPermutation(size, (self.seed, epoch, shard_index))
            for at in range(step, steps_per_epoch):
                members = order(np.arange(at * batch_size, (at + 1) * batch_size, dtype=np.int64))
                yield self._train.gather(members * num_shards + shard_index)
            step = 0
            epoch += 1

    def _order(self, epoch: int) -> EpochOrder:
        if epoch not in self._orders:
            self._orders = {epoch: EpochOrder(self._train.counts, self.seed, epoch)}  # one epoch at a time
        return self._orders[epoch]

    def shards_at(self, epoch: int, start: int, count: int) -> list[int]:
        """The train shards positions [start, start + count) of epoch `epoch` lie in."""
        return self._order(epoch).shards(start, count)

    def has_shards(self, shards: list[int]) -> bool:
        """Whether these train shards are here (mapped, or fetched and now mapped)."""
        return all(self._train.here(i) for i in shards)

    def fetch_shards(self, shards: list[int]) -> None:
        """Fetch the train shards of these that are not here, in this order, and keep them all."""
        if self.fetch is not None:
            self.fetch.want(self._train.shards[i].name for i in shards)

    def batches_at(self, epoch: int, start: int, count: int, batch_size: int) -> list[Batch]:
        """Batches of the sequences at positions [start, start + count) of epoch `epoch`'s order
        (worker/data/epoch_order.py): what the coordinator hands out on prepared data."""
        ids = self._order(epoch).ids(np.arange(start, start + count, dtype=np.int64))
        return [self._train.gather(ids[i : i + batch_size]) for i in range(0, count, batch_size)]

    def validation_batches(self, batch_size: int, max_batches: int) -> list[Batch]:
        """The same validation batches on every machine (worker.data.tokens.validation_ids)."""
        return [self._val.gather(ids) for ids in validation_ids(self.num_validation_sequences, batch_size, max_batches)]
