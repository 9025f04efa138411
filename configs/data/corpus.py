"""Finding and reading the documents a run trains on.

`DataConfig.paths == []` selects the embedded corpus: the `*.py` files of the Python
standard library this interpreter runs on, which every machine that runs swarmtrain has.
Otherwise `paths` lists local `.txt` / `.jsonl` files or directories of them; a further
`.gz` or `.zst` suffix (e.g. `part-0001.jsonl.zst`) is read through gzip or zstandard.

Reading is deterministic across machines: directories are walked recursively and their
files sorted by relative path; each `.txt` (or stdlib `.py`) file is one document; each
non-blank `.jsonl` line is one record whose `DataConfig.jsonl_field` string is a document.
Document names are machine-independent (relative to what `paths` names), because the
train/validation split hashes them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from configs.data.errors import DataError
from configs.schema import DataConfig

__all__ = [
    "CorpusFile",
    "DataError",
    "Document",
    "Progress",
    "describe_source",
    "find_files",
    "iter_documents",
    "stdlib_root",
]

# Called with (bytes of input read so far, total bytes expected) while reading.
Progress = Callable[[int, int], None]

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
COMPRESSED_SUFFIXES = (".gz", ".zst")  # after .txt or .jsonl: read through gzip or zstandard
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_FIX_PATHS = "point it at .txt or .jsonl files (.gz or .zst compressed too) or a directory of them, or use [] for the embedded corpus"
_JSONL_PROGRESS_EVERY = 4 << 20  # bytes between progress reports inside one JSONL file


@dataclass(frozen=True)
class Document:
    name: str  # machine-independent, e.g. "asyncio/events.py" or "corpus/a.jsonl:12"
    text: str


@dataclass(frozen=True)
class CorpusFile:
    path: Path  # where to read it on this machine
    name: str  # machine-independent name: relative to the directory that `paths` names
    kind: Literal["text", "jsonl"]
    size: int  # bytes on disk


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def describe_source(cfg: DataConfig) -> str:
    """A short human name for where the documents come from."""
    if not cfg.paths:
        return f"python {sys.version_info.major}.{sys.version_info.minor} stdlib"
    shown = ", ".join(cfg.paths[:3])
    return shown if len(cfg.paths) <= 3 else f"{shown} (+{len(cfg.paths) - 3} more)"


def find_files(cfg: DataConfig) -> list[CorpusFile]:
    """Every file the corpus reads, in reading order. Raises DataError for a bad `paths` entry."""
    if not cfg.paths:
        return _stdlib_files()
    files: list[CorpusFile] = []
    seen: set[Path] = set()
    for given in cfg.paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise DataError(f"data.paths: {given} does not exist; {_FIX_PATHS}")
        if path.is_dir():
            found = _walk(path, path.resolve().name, given)
            if not found:
                raise DataError(
                    f"data.paths: {given} is a directory with no .txt or .jsonl files "
                    f"(searched recursively); {_FIX_PATHS}"
                )
        else:
            kind = _kind(path.name)
            if kind is None:
                raise DataError(f"data.paths: {given} is not a .txt or .jsonl file; {_FIX_PATHS}")
            found = [CorpusFile(path, _document_name(path.name), kind, _size(path, given))]
        for file in found:
            key = file.path.resolve()
            if key not in seen:  # a file listed twice (or inside a listed directory) is read once
                seen.add(key)
                files.append(file)
    return files


def iter_documents(cfg: DataConfig, progress: Progress | None = None) -> Iterator[Document]:
    """The corpus's documents in a fixed order, at most `cfg.max_corpus_bytes` of UTF-8 text.

    The document that crosses `max_corpus_bytes` is cut there (at a character boundary).
    Raises DataError for missing paths, unreadable files, bad JSONL lines and an empty corpus.
    """
    files = find_files(cfg)
    total = sum(f.size for f in files)
    if cfg.max_corpus_bytes is not None:
        total = min(total, cfg.max_corpus_bytes)
    budget = cfg.max_corpus_bytes
    done = 0
    yielded = 0
    for file in files:
        reader = _JsonlReader(file, cfg.jsonl_field) if file.kind == "jsonl" else None
        docs = reader if reader is not None else (Document(file.name, _read_text(file)),)
        for doc in docs:
            if not doc.text:
                continue
            if budget is not None:
                encoded = doc.text.encode("utf-8")
                if len(encoded) >= budget:
                    text = encoded[:budget].decode("utf-8", errors="ignore")
                    if text:
                        yield Document(doc.name, text)
                        yielded += 1
                    budget = 0
                    break
                budget -= len(encoded)
            yield doc
            yielded += 1
            if progress and reader is not None and reader.consumed - reader.reported >= _JSONL_PROGRESS_EVERY:
                reader.reported = reader.consumed
                progress(min(done + reader.consumed, total), total)
        done += file.size
        if budget == 0:
            break
        if progress:
            progress(min(done, total), total)
    if progress:
        progress(total, total)
    if not yielded:
        raise DataError(_empty_message(cfg, files))


def _empty_message(cfg: DataConfig, files: list[CorpusFile]) -> str:
    if not cfg.paths:
        return (
            f"data.paths: [] reads the Python standard library's source, but {stdlib_root()} has no "
            f".py files (this Python ships it compiled or zipped); point data.paths at .txt or .jsonl files"
        )
    return (
        f"data.paths: {describe_source(cfg)} holds no text ({len(files)} file(s), all empty or with "
        f"empty '{cfg.jsonl_field}' fields); {_FIX_PATHS}"
    )


def _document_name(name: str) -> str:
    """A file's name for the documents it holds, without a compression suffix: compressing a
    corpus does not move its documents between train and validation."""
    for suffix in COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _kind(filename: str) -> Literal["text", "jsonl"] | None:
    lower = filename.lower()
    for suffix in COMPRESSED_SUFFIXES:
        lower = lower.removesuffix(suffix)
    if lower.endswith(TEXT_SUFFIXES):
        return "text"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _size(path: Path, shown: str | Path) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise DataError(f"data.paths: cannot read {shown}: {err.strerror or err}") from None


def _walk(root: Path, prefix: str, given: str) -> list[CorpusFile]:
    """Data files under `root`, sorted by relative path; hidden files and directories skipped."""
    found: list[tuple[str, Path, Literal["text", "jsonl"]]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            kind = _kind(filename)
            if kind is None or filename.startswith("."):
                continue
            path = Path(dirpath, filename)
            found.append((path.relative_to(root).as_posix(), path, kind))
    found.sort(key=lambda item: item[0])
    shown = given.rstrip("/\\") or given
    return [
        CorpusFile(path, _document_name(f"{prefix}/{rel}" if prefix else rel), kind, _size(path, f"{shown}/{rel}"))
        for rel, path, kind in found
    ]


def _stdlib_files() -> list[CorpusFile]:
    root = stdlib_root()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(dirpath, filename)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    files = []
    for rel, path in found:
        try:
            size = path.stat().st_size
        except OSError:  # a dangling link in the installation: not part of the corpus
            continue
        files.append(CorpusFile(path, rel, "text", size))
    return files


def _read_text(file: CorpusFile) -> str:
    try:
        with _Source(file.path) as handle:
            raw = handle.read()
    except OSError as err:
        raise DataError(f"data.paths: cannot read {file.path}: {err.strerror or err}") from None
    # Undecodable bytes become U+FFFD (deterministically); line endings are unified so a
    # checkout with CRLF endings yields the same tokens as one with LF.
    text = raw.decode("utf-8-sig", errors="replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


class _JsonlReader:
    """Documents of one JSONL file, with a count of the bytes read so far."""

    def __init__(self, file: CorpusFile, field: str) -> None:
        self.file = file
        self.field = field
        self.consumed = 0
        self.reported = 0

    def __iter__(self) -> Iterator[Document]:
        path, field = self.file.path, self.field
        try:
            handle = _Source(path)
        except OSError as err:
            raise DataError(f"data.paths: cannot read {path}: {err.strerror or err}") from None
        with handle:
            for lineno, line in enumerate(handle, start=1):
                self.consumed = handle.compressed_read()
                if not line.strip():
                    continue
                where = f"data.paths: {path} line {lineno}"
                try:
                    record = json.loads(line)
                except (ValueError, UnicodeDecodeError) as err:
                    reason = getattr(err, "msg", None) or str(err).splitlines()[0]
                    raise DataError(
                        f"{where}: not valid JSON ({reason}); each line must be one JSON object"
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{where}: a JSON {type(record).__name__}, not an object; each line must be "
                        f"one JSON object with a string field '{field}'"
                    )
                if field not in record:
                    raise DataError(
                        f"{where}: no field '{field}'; set data.jsonl_field to the field that holds "
                        f"the text (this record has: {', '.join(sorted(record)[:8]) or 'no fields'})"
                    )
                text = record[field]
                if not isinstance(text, str):
                    raise DataError(
                        f"{where}: field '{field}' is a JSON {type(text).__name__}, not a string; "
                        f"set data.jsonl_field to the field that holds the text"
                    )
                yield Document(f"{self.file.name}:{lineno}", text)


class _Source:
    """A corpus file opened for reading bytes, through gzip or zstandard when its name says so;
    `compressed_read()` is how far into the file on disk reading has come (for progress)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._raw = path.open("rb")
        lower = path.name.lower()
        self._errors: tuple[type[BaseException], ...] = (OSError, EOFError)  # gzip.BadGzipFile is an OSError
        try:
            if lower.endswith(".gz"):
                self._stream: io.BufferedIOBase = gzip.GzipFile(fileobj=self._raw)
            elif lower.endswith(".zst"):
                import zstandard

                self._stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(self._raw))
                self._errors = (OSError, EOFError, zstandard.ZstdError)
            else:
                self._stream = self._raw
        except BaseException:
            self._raw.close()
            raise

    def compressed_read(self) -> int:
        return self._raw.tell()

    def read(self) -> bytes:
        try:
            return self._stream.read()
        except self._errors as err:
            raise DataError(f"data.paths: {self.path} is not a readable {self.path.suffix} file ({err})") from None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except self._errors as err:
            raise DataError(f"data.paths: {self.path} is not a readable {self.path.suffix} file ({err})") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()
        self._raw.close()
