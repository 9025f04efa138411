"""Which documents are held out for validation: a keyed hash of each document's name.

The same rule splits the corpus whether a worker tokenizes it itself (`worker.data.tokens`) or
`coordinator data prepare` writes it as shards, so the two hold out the same documents.
"""

from __future__ import annotations

import hashlib

__all__ = ["is_validation_document"]

_SPLIT_KEY = b"swarmtrain-split"  # keys the document hash; 16 bytes, blake2b's `person` limit


def is_validation_document(name: str, validation_fraction: float) -> bool:
    """Whether the document called `name` belongs to validation (before any fallback).

    A keyed 64-bit hash of the name, read as a fraction of 2**64: stable across machines,
    Python versions and runs, and independent of every other document.
    """
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8, person=_SPLIT_KEY)
    return int.from_bytes(digest.digest(), "big") < validation_fraction * 2.0**64
