"""Which token data a run trains on: prepared shards (here, or fetched) when the config names them,
else its corpus, read and tokenized here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from configs.data.shards import MANIFEST
from configs.schema import DataConfig
from worker.data.prepared import PreparedData
from worker.data.shard_cache import ShardSource
from worker.data.tokens import TokenData

__all__ = ["open_token_data"]


def open_token_data(data: DataConfig, seq_len: int, seed: int, source: ShardSource | None = None,
                    log: Callable[[str], None] = print) -> PreparedData | TokenData:
    """`data.prepared`'s shards, memory-mapped: where it names them, or fetched through `source`
    when `data.url` is set or this machine has no such directory; else the corpus."""
    if data.prepared is None:
        return TokenData(data, seq_len, seed)
    here = (Path(data.prepared).expanduser() / MANIFEST).exists()
    if (data.url or not here) and source is not None and source.url:
        fetch = source.open(log)
        log(f"data: fetching shards from {source.url} into {fetch.directory} as training needs them "
            f"(at most {source.cache_bytes / 1e9:.0f} GB kept)")
        return PreparedData(data, seq_len, seed, fetch=fetch)
    return PreparedData(data, seq_len, seed)
