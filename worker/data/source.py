"""Which token data a run trains on: prepared shards when the config names them, else its corpus."""

from __future__ import annotations

from configs.schema import DataConfig
from worker.data.prepared import PreparedData
from worker.data.tokens import TokenData

__all__ = ["open_token_data"]


def open_token_data(data: DataConfig, seq_len: int, seed: int) -> PreparedData | TokenData:
    """`data.prepared`'s shards, memory-mapped, when it names them; else the corpus, read and tokenized here."""
    if data.prepared is not None:
        return PreparedData(data, seq_len, seed)
    return TokenData(data, seq_len, seed)
