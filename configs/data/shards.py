"""Prepared token shards: what `coordinator data prepare` writes and workers memory-map.

A prepared directory holds, per split ("train", "validation"):
- `<split>-NNNNN.tokens`: raw little-endian token ids (uint16 when the vocabulary fits, else
  uint32), documents joined by the tokenizer's end-of-text token; every shard but a split's
  last holds exactly `shard_tokens` tokens, and a document may run on into the next shard.
- `<split>-NNNNN.docs`: little-endian uint64 offsets, within the shard, of the documents that
  start in it: the document boundaries, for tools that want them.
and `manifest.json` (format, tokenizer fingerprint, dtype, shards with their token counts and
sha256). A shard reaches its final name only complete and synced to disk, the manifest only
once every shard has, so a directory with a manifest is whole and one without is a prepare
still under way (its `prepare-state.json` lets it resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configs.data.errors import DataError

__all__ = ["FORMAT", "MANIFEST", "SPLITS", "Manifest", "ShardInfo", "ShardWriter", "read_manifest",
           "token_dtype", "write_json_atomic"]

FORMAT = "swarmtrain-tokens/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
_PREPARE_HINT = "coordinator data prepare --config C --out DIR"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # the tokens file, e.g. "train-00000.tokens"; the boundaries are in name.docs
    tokens: int
    documents: int  # documents that start in this shard
    sha256: str  # of the tokens file

    @property
    def docs_name(self) -> str:
        return self.name.removesuffix(".tokens") + ".docs"


@dataclass(frozen=True)
class Manifest:
    tokenizer: str  # a readable name
    tokenizer_fingerprint: str  # configs.data.tokenizer.Tokenizer.fingerprint
    vocab_size: int
    eos_id: int | None
    dtype: str  # "uint16" or "uint32", little-endian
    shard_tokens: int
    validation_fraction: float
    source: str  # what was read, for people
    text_bytes: int
    documents: int
    train: tuple[ShardInfo, ...] = ()
    validation: tuple[ShardInfo, ...] = ()
    format: str = field(default=FORMAT)
    inputs: str = ""  # what was prepared and how (files, tokenizer, settings), hashed: a rerun must match

    def shards(self, split: str) -> tuple[ShardInfo, ...]:
        return self.train if split == "train" else self.validation

    def tokens(self, split: str) -> int:
        return sum(shard.tokens for shard in self.shards(split))

    def sequences(self, split: str, seq_len: int) -> list[int]:
        """Sequences of `seq_len + 1` tokens in each shard of `split`: they never cross a shard."""
        return [max(0, (shard.tokens - 1) // seq_len) for shard in self.shards(split)]

    @property
    def fingerprint(self) -> str:
        """16 hex digits: equal for two directories iff they hold the same tokens in the same shards."""
        h = hashlib.blake2b(digest_size=8, person=b"swarmtrain-shard")
        h.update(f"{self.format} {self.dtype} {self.tokenizer_fingerprint} ".encode())
        for split in SPLITS:
            for shard in self.shards(split):
                h.update(f"{split} {shard.tokens} {shard.sha256} ".encode())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object, where: str) -> Manifest:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise DataError(f"{where}: not a {FORMAT} manifest (format {found!r}); prepare it again with {_PREPARE_HINT}")
        try:
            splits = {split: tuple(ShardInfo(**shard) for shard in raw[split]) for split in SPLITS}
            manifest = cls(**{**raw, **splits})
        except (TypeError, KeyError) as err:
            raise DataError(f"{where}: a damaged manifest ({err}); prepare it again with {_PREPARE_HINT}") from None
        for split in SPLITS:  # names become paths on a worker: nothing but this directory's shards
            for shard in manifest.shards(split):
                if not re.fullmatch(rf"{split}-\d{{5}}\.tokens", str(shard.name)):
                    raise DataError(f"{where}: {shard.name!r} is not a {split} shard's name; the manifest is "
                                    f"damaged or not from {_PREPARE_HINT}")
        return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of prepared data in `directory`; DataError (one line: what to do) when there is none."""
    directory = Path(directory).expanduser()
    path = directory / MANIFEST
    if not directory.is_dir():
        raise DataError(f"data.prepared: {directory} is not a directory; prepare data into it with {_PREPARE_HINT}")
    if not path.exists():
        pending = (directory / "prepare-state.json").exists()
        why = "its prepare has not finished: run the same prepare again to resume it" if pending \
            else f"it holds no {MANIFEST}: prepare data into it with {_PREPARE_HINT}"
        raise DataError(f"data.prepared: {directory}: {why}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"data.prepared: {path} cannot be read ({err}); prepare it again with {_PREPARE_HINT}") from None
    return Manifest.from_json(raw, f"data.prepared: {path}")


def write_json_atomic(path: Path, value: object) -> None:
    """Write `value` as JSON to a temporary file, sync it, and rename it over `path`."""
    temp = path.with_name(f".{path.name}.tmp")
    with temp.open("w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(path)


class ShardWriter:
    """Appends one split's documents to numbered shards of `shard_tokens` tokens in `directory`.

    The shard being filled lives under a `.partial` name, and so does a full one until
    `commit()`: the caller first records `state()` (which syncs the files and says what a later
    writer needs to go on from exactly here, `resume=`), then commits, which renames the full
    shards into place. A writer resumed from a state renames the shards that state lists as full
    (a stop between the record and the renames) and cuts the partial files back to the state,
    so tokens written after it are written again, never twice.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 resume: dict[str, Any] | None = None) -> None:
        if shard_tokens < 2:
            raise ValueError(f"shard_tokens must be >= 2 (got {shard_tokens})")
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[ShardInfo] = [ShardInfo(**s) for s in resume["shards"]] if resume else []
        self._filled = resume["partial_tokens"] if resume else 0
        self._docs = resume["partial_documents"] if resume else 0
        self._full: list[int] = list(range(len(self.shards)))  # full shards maybe not renamed yet
        self.commit()
        self._open(truncate_to=(self._filled, self._docs))

    def _paths(self, index: int | None = None) -> tuple[Path, Path]:
        stem = f"{self.split}-{len(self.shards) if index is None else index:05d}"
        return self.directory / f"{stem}.tokens.partial", self.directory / f"{stem}.docs.partial"

    def commit(self) -> None:
        """Rename the full shards into place (after their state was recorded)."""
        for index in self._full:
            for partial in self._paths(index):
                if partial.exists():
                    partial.replace(partial.with_name(partial.name.removesuffix(".partial")))
                elif not partial.with_name(partial.name.removesuffix(".partial")).exists():
                    raise DataError(f"{partial.name.removesuffix('.partial')} is missing though the prepare state "
                                    f"lists it: delete {self.directory} and prepare again")
        self._full = []

    def _open(self, truncate_to: tuple[int, int]) -> None:
        tokens_path, docs_path = self._paths()
        self._hash = hashlib.sha256()
        for path, size in ((tokens_path, truncate_to[0] * self.dtype.itemsize), (docs_path, truncate_to[1] * 8)):
            final = path.with_name(path.name.removesuffix(".partial"))
            if size and not path.exists() and final.exists():  # finished after the state was recorded
                final.replace(path)
            with path.open("ab") as handle:
                if handle.tell() < size:
                    raise DataError(f"{path} is shorter than the prepare state says: delete {self.directory} "
                                    "and prepare again")
                handle.truncate(size)
        with tokens_path.open("rb") as handle:  # the hash goes on from what is already there
            for block in iter(lambda: handle.read(1 << 20), b""):
                self._hash.update(block)
        self._tokens = tokens_path.open("ab")
        self._doc_offsets = docs_path.open("ab")

    def add_document(self, ids: np.ndarray) -> None:
        """One document's tokens (its end-of-text separator included)."""
        self._doc_offsets.write(self._filled.to_bytes(8, "little"))
        self._docs += 1
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while len(ids):
            take = min(len(ids), self.shard_tokens - self._filled)
            block = ids[:take].tobytes()
            self._tokens.write(block)
            self._hash.update(block)
            self._filled += take
            ids = ids[take:]
            if self._filled == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        for handle in (self._tokens, self._doc_offsets):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        tokens_path, _ = self._paths()
        info = ShardInfo(tokens_path.name.removesuffix(".partial"), self._filled, self._docs, self._hash.hexdigest())
        self._full.append(len(self.shards))  # renamed by commit(), once a state lists it
        self.shards.append(info)
        self._filled = self._docs = 0
        self._open(truncate_to=(0, 0))

    @property
    def tokens(self) -> int:
        """Tokens written so far, finished shards and the partial one."""
        return sum(shard.tokens for shard in self.shards) + self._filled

    def state(self) -> dict[str, Any]:
        for handle in (self._tokens, self._doc_offsets):
            handle.flush()
            os.fsync(handle.fileno())
        return {"shards": [asdict(s) for s in self.shards], "partial_tokens": self._filled,
                "partial_documents": self._docs}

    def finish(self) -> tuple[ShardInfo, ...]:
        """Close the last, shorter shard (none when it is empty), commit, and return every shard."""
        if self._filled:
            self._close_shard()
        self._tokens.close()
        self._doc_offsets.close()
        for path in self._paths():
            path.unlink(missing_ok=True)
        self.commit()
        return tuple(self.shards)
