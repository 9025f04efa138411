"""`/data/`: the coordinator serves its prepared data to workers when no `data.url` is set.

A WSGI handler on the metrics port: `GET /data/manifest.json` and `GET /data/<shard>` for the
files the manifest names, nothing else (no directory listing, no path outside it). A `Range:
bytes=N-` or `bytes=N-M` header gets 206 and that part, so an interrupted download resumes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from configs.data.errors import DataError
from configs.data.shards import MANIFEST, SPLITS, read_manifest

DATA_PATH = "/data/"
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_BLOCK = 1 << 20


class DataFiles:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        manifest = read_manifest(self.directory)
        self.names = {MANIFEST} | {s.name for split in SPLITS for s in manifest.shards(split)}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        name = str(environ.get("PATH_INFO", ""))[len(DATA_PATH):]
        if name not in self.names:
            return _plain(start_response, "404 Not Found", f"no {name!r} here: the manifest names the files\n")
        path = self.directory / name
        try:
            size = path.stat().st_size
        except OSError:
            return _plain(start_response, "404 Not Found", f"{name} is missing on the coordinator\n")
        first, last, status = 0, size - 1, "200 OK"
        wanted = environ.get("HTTP_RANGE")
        if wanted:
            match = _RANGE.match(wanted.strip())
            if match:
                first = int(match.group(1))
                last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if not match or first >= size or last < first:
                start_response("416 Range Not Satisfiable", [("Content-Range", f"bytes */{size}"),
                                                             ("Content-Length", "0")])
                return [b""]
            status = "206 Partial Content"
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(last - first + 1)),
                   ("Accept-Ranges", "bytes")]
        if status.startswith("206"):
            headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
        start_response(status, headers)
        return _read(path, first, last - first + 1)


def data_files(directory: str | None) -> DataFiles | None:
    """The handler for a run's prepared data; None without any (or when it cannot be read: the
    coordinator's start-up check has already named that problem)."""
    if directory is None:
        return None
    try:
        return DataFiles(directory)
    except DataError:
        return None


def _read(path: Path, offset: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(offset)
        while length > 0:
            block = handle.read(min(_BLOCK, length))
            if not block:
                return
            length -= len(block)
            yield block


def _plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
