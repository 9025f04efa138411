"""`coordinator data prepare`: read a run's corpus once, as a stream, into prepared token shards.

The documents come from `configs.data.corpus` in its fixed order and go to train or validation
by the same keyed hash a worker's own reading uses (`configs.data.split`). They are tokenized in
chunks of a few MB: a Hugging Face tokenizer's batch encoding runs on every core. Each split
streams into its own `ShardWriter` (`configs.data.shards`), so memory stays at a chunk however
large the corpus.

Resuming: after every chunk that completed a shard, both writers sync and the number of
documents read so far goes to `prepare-state.json` (written by rename). A prepare that stops
anywhere, even killed, starts again from that state: the partial shards are cut back to it,
the documents before it are read but not tokenized, and nothing already in a finished shard is
written again. The state also records the inputs and settings, and a prepare of different
ones into the same directory is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs.data.corpus import describe_source, find_files, iter_documents
from configs.data.errors import DataError
from configs.data.shards import (
    MANIFEST,
    SPLITS,
    Manifest,
    ShardWriter,
    read_manifest,
    token_dtype,
    write_json_atomic,
)
from configs.data.split import is_validation_document
from configs.data.tokenizer import Tokenizer, load_tokenizer
from configs.schema import DataConfig

__all__ = ["DEFAULT_SHARD_TOKENS", "PrepareProgress", "prepare"]

DEFAULT_SHARD_TOKENS = 64 << 20  # 128 MB of uint16: a minute of download at 20 Mbit/s
STATE = "prepare-state.json"
_CHUNK_CHARS = 8 << 20  # text handed to the tokenizer at once
_CHUNK_DOCS = 4096


@dataclass(frozen=True)
class PrepareProgress:
    bytes_read: int  # of the corpus files as stored (compressed where they are)
    bytes_total: int
    documents: int
    tokens: int  # written so far, both splits
    skipped: int  # documents a resumed prepare read past without tokenizing again
    elapsed_s: float


def _settings(data: DataConfig, tokenizer: Tokenizer, shard_tokens: int) -> dict[str, object]:
    """What the output depends on: a resumed prepare must have the same."""
    files = hashlib.sha256()
    for file in find_files(data):
        files.update(f"{file.name}\0{file.size}\0".encode())
    return {"files": files.hexdigest()[:16], "tokenizer": tokenizer.fingerprint, "shard_tokens": shard_tokens,
            "validation_fraction": data.validation_fraction, "jsonl_field": data.jsonl_field,
            "max_corpus_bytes": data.max_corpus_bytes}


def _load_state(out: Path, settings: dict[str, object]) -> dict | None:
    path = out / STATE
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise DataError(f"--out {out} is not empty and holds no prepare to resume: choose a new or empty directory")
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"--out {out}: its {STATE} cannot be read ({err}): delete {out} and prepare again") from None
    if state.get("settings") != settings:
        raise DataError(f"--out {out} holds a prepare of other inputs or settings: choose another directory, "
                        f"or delete {out} to prepare this one")
    return state


def prepare(data: DataConfig, out: str | Path, *, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            progress: Callable[[PrepareProgress], None] | None = None) -> Manifest:
    """Prepare `data`'s corpus as token shards in `out` and return their manifest.

    A directory that already holds this prepare's finished manifest is returned as it is.
    Raises DataError (one line: what is wrong and what to do) for bad sources and directories.
    """
    out = Path(out).expanduser()
    tokenizer = load_tokenizer(data.tokenizer)
    settings = _settings(data, tokenizer, shard_tokens)
    inputs = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.inputs != inputs:
            raise DataError(f"--out {out} holds data prepared from other inputs or settings: choose another "
                            "directory")
        return manifest
    state = _load_state(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    resume = state["splits"] if state else {}
    writers = {split: ShardWriter(out, split, dtype, shard_tokens, resume.get(split)) for split in SPLITS}
    done_docs = state["documents"] if state else 0
    if state is None:  # from now on the directory is this prepare's, and a rerun resumes it
        _save(out, settings, 0, 0, writers)
    text_bytes = state["text_bytes"] if state else 0
    eos = np.array([] if tokenizer.eos_id is None else [tokenizer.eos_id], dtype=np.int64)
    started = time.monotonic()
    read = [0, 0]  # bytes read, bytes total: from the corpus reader's progress calls
    documents = 0
    pending: list[tuple[str, str]] = []
    pending_chars = 0

    def report() -> None:
        if progress is not None:
            tokens = sum(w.tokens for w in writers.values())
            progress(PrepareProgress(read[0], read[1], documents, tokens, min(documents, done_docs),
                                     time.monotonic() - started))

    def flush() -> None:
        nonlocal text_bytes
        shards_before = sum(len(w.shards) for w in writers.values())
        encoded = tokenizer.encode_arrays([text for _, text in pending])
        for (name, text), ids in zip(pending, encoded, strict=True):
            text_bytes += len(text.encode("utf-8"))
            split = "validation" if is_validation_document(name, data.validation_fraction) else "train"
            writers[split].add_document(np.concatenate([ids, eos]))
        pending.clear()
        if sum(len(w.shards) for w in writers.values()) > shards_before:
            _save(out, settings, documents, text_bytes, writers)
            for writer in writers.values():  # recorded: now the full shards take their names
                writer.commit()
        report()

    def on_read(done: int, total: int) -> None:
        read[0], read[1] = done, total

    for doc in iter_documents(data, on_read):
        documents += 1
        if documents <= done_docs:  # in a shard already (or in a partial one, cut back to it)
            if documents % _CHUNK_DOCS == 0:
                report()
            continue
        pending.append((doc.name, doc.text))
        pending_chars += len(doc.text)
        if pending_chars >= _CHUNK_CHARS or len(pending) >= _CHUNK_DOCS:
            flush()
            pending_chars = 0
    if pending:
        flush()
    empty = [split for split in SPLITS if writers[split].tokens == 0]
    if empty:
        raise DataError(f"data: the {' and '.join(empty)} split of {describe_source(data)} is empty "
                        f"({documents:,} documents, validation_fraction={data.validation_fraction}): add documents "
                        f"or change data.validation_fraction, and prepare into a new directory")
    shards = {split: writers[split].finish() for split in SPLITS}
    manifest = Manifest(tokenizer=tokenizer.name, tokenizer_fingerprint=tokenizer.fingerprint,
                        vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, dtype=dtype.name,
                        shard_tokens=shard_tokens, validation_fraction=data.validation_fraction,
                        source=describe_source(data), text_bytes=text_bytes, documents=documents,
                        train=shards["train"], validation=shards["validation"], inputs=inputs)
    write_json_atomic(out / MANIFEST, manifest.to_json())
    (out / STATE).unlink(missing_ok=True)
    report()
    return manifest


def _save(out: Path, settings: dict[str, object], documents: int, text_bytes: int,
          writers: dict[str, ShardWriter]) -> None:
    splits = {split: writer.state() for split, writer in writers.items()}
    write_json_atomic(out / STATE, {"settings": settings, "documents": documents, "text_bytes": text_bytes,
                                    "splits": splits})
