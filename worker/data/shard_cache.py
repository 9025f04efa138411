"""Prepared data fetched over HTTP(S) into a bounded local cache: a volunteer holds only the
shards it trains.

`ShardFetch(url, cache_root, max_bytes)` reads `url/manifest.json` at once (a clear error when it
cannot) and keeps the shards under `cache_root/<manifest fingerprint>/`. `want(names)` queues
shards for a background thread that downloads them one at a time: resumed with a Range request
when a `.partial` file is left from an interrupted try (a server that ignores Range sends the
whole file, and it is written from the start), checked against the manifest's size and sha256,
and renamed into place only then. A shard that fails is tried again after a pause, and the
problem is said once. When the cache holds more than `max_bytes`, the least recently used
shards that no held range needs go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from configs.data.errors import DataError
from configs.data.shards import MANIFEST, SPLITS, Manifest, write_json_atomic

__all__ = ["ShardFetch", "ShardSource"]

DEFAULT_CACHE = Path("~/.cache/swarmtrain/data")
DEFAULT_CACHE_BYTES = 20 * 10**9
RETRY_S = 10.0  # after a failed download, before the next try
_TIMEOUT_S = 60.0  # per read: a stalled server is a failed try
_BLOCK = 1 << 20


@dataclass(frozen=True)
class ShardSource:
    """Where a worker without its own copy of the prepared data fetches it, and where it keeps it."""

    url: str = ""  # data.url, or the coordinator's /data/ (JoinResponse.data_url); "" before a join
    cache_dir: Path = DEFAULT_CACHE  # worker --data-cache
    cache_bytes: int = DEFAULT_CACHE_BYTES  # worker --data-cache-size

    def open(self, log: Callable[[str], None]) -> ShardFetch:
        return ShardFetch(self.url, self.cache_dir, self.cache_bytes, log)


class ShardFetch:
    def __init__(self, url: str, cache_root: str | Path, max_bytes: int, log: Callable[[str], None] = print) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.max_bytes, self.log = max_bytes, log
        try:
            with urllib.request.urlopen(self.url + MANIFEST, timeout=_TIMEOUT_S) as reply:
                raw = json.loads(reply.read())
        except (OSError, ValueError) as err:  # URLError, HTTPError, timeouts and bad JSON
            raise DataError(f"data.url: cannot read {self.url}{MANIFEST} ({_reason(err)}): check that the operator "
                            "publishes the prepared directory there") from None
        self.manifest = Manifest.from_json(raw, f"data.url: {self.url}{MANIFEST}")
        self.directory = Path(cache_root).expanduser() / self.manifest.fingerprint
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.directory / MANIFEST, self.manifest.to_json())
        except OSError as err:
            raise DataError(f"--data-cache {cache_root}: cannot write there ({err.strerror or err}): pick a "
                            "directory this user can write") from None
        itemsize = 2 if self.manifest.dtype == "uint16" else 4
        self._shards = {s.name: (s.tokens * itemsize, s.sha256) for split in SPLITS for s in self.manifest.shards(split)}
        self._lock = threading.Condition()
        self._queue: list[str] = []
        self._pinned: set[str] = set()
        self._said: set[str] = set()
        self._thread: threading.Thread | None = None
        self._downloading = threading.Lock()  # one download at a time: a shard has one .partial
        self.on_evict: list[Callable[[str], None]] = []  # told each shard dropped from the cache

    def path(self, name: str) -> Path | None:
        """The shard's file once it is here and checked; None while it is not."""
        path = self.directory / name
        if path.exists():
            os.utime(path)  # recently used: evicted last
            return path
        return None

    def want(self, names: Iterable[str]) -> None:
        """Fetch these shards (those not here yet), in this order, and no others; they are kept out
        of eviction."""
        names = list(names)
        with self._lock:
            self._pinned = set(names)
            self._queue = [name for name in names if not (self.directory / name).exists()]
            if self._queue and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shard-fetch", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def fetch_now(self, name: str) -> Path:
        """The shard, downloaded in this thread if need be (for the few validation shards)."""
        with self._downloading:
            return self.path(name) or self._download(name)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                name = self._queue[0]
            try:
                with self._downloading:
                    if not (self.directory / name).exists():
                        self._download(name)
            except Exception as err:  # noqa: BLE001 - a network or server fault: said once, tried again
                if name not in self._said:
                    self._said.add(name)
                    self.log(f"data: cannot fetch {name} from {self.url} ({_reason(err)}); trying again every "
                             f"{RETRY_S:.0f} s")
                with self._lock:  # the others first: one bad shard must not hold them up
                    if name in self._queue:
                        self._queue.remove(name)
                        self._queue.append(name)
                time.sleep(RETRY_S)
                continue
            with self._lock:
                if name in self._queue:
                    self._queue.remove(name)

    def _download(self, name: str) -> Path:
        size, sha256 = self._shards[name]
        final, partial = self.directory / name, self.directory / f"{name}.partial"
        have = partial.stat().st_size if partial.exists() else 0
        if have < size:  # else a whole one is here already (a stop while it was being checked)
            request = urllib.request.Request(self.url + name, headers={"Range": f"bytes={have}-"} if have else {})
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as reply, \
                    partial.open("ab" if have and reply.status == 206 else "wb") as out:
                for block in iter(lambda: reply.read(_BLOCK), b""):
                    out.write(block)
            got = partial.stat().st_size
            if got < size:  # the connection ended early: keep what came, the next try goes on from it
                raise OSError(f"the connection closed at {got:,} of {size:,} bytes")
        digest = hashlib.sha256()
        with partial.open("rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
        if partial.stat().st_size != size or digest.hexdigest() != sha256:
            partial.unlink()
            raise ValueError(f"{name} does not match the manifest's size and sha256: the published copy is damaged")
        partial.replace(final)
        self._evict()
        return final

    def _evict(self) -> None:
        held = [p for p in self.directory.iterdir() if p.name in self._shards]
        total = sum(p.stat().st_size for p in held)
        for path in sorted(held, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                return
            if path.name not in self._pinned:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)
                for tell in self.on_evict:  # a memory map would keep its disk space taken
                    tell(path.name)


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__
