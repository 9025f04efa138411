"""Fetching prepared data over HTTP: the coordinator's `/data/` files (Range requests included)
served by a real HTTP server, a worker's bounded cache, and the order that keeps a handed-out
range inside one shard."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import numpy as np
import pytest

from configs.data.errors import DataError
from configs.data.shards import read_manifest
from configs.schema import DataConfig
from coordinator.api.data_files import DataFiles
from coordinator.data.prepare import prepare
from tests.harness.coordinator_process import wait_for
from worker.data.epoch_order import EpochOrder
from worker.data.shard_cache import ShardFetch


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def published(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """Prepared data of the embedded corpus behind a real HTTP server running the coordinator's
    `/data/` handler; yields its base URL, the directory, and the Range headers it was sent."""
    directory = tmp_path / "prepared"
    prepare(DataConfig(max_corpus_bytes=1_000_000, validation_fraction=0.2), directory, shard_tokens=1 << 17)
    files = DataFiles(directory)
    ranges: list[str] = []

    def app(environ, start_response):
        ranges.append(environ.get("HTTP_RANGE", ""))
        return files(environ, start_response)

    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/data/", directory, ranges
    server.shutdown()
    server.server_close()


def test_a_worker_fetches_the_shards_it_wants_checked_and_resumes_a_partial_one(published, tmp_path: Path) -> None:
    url, directory, ranges = published
    fetch = ShardFetch(url, tmp_path / "cache", 10**9)
    names = [s.name for s in fetch.manifest.train]
    assert fetch.manifest.fingerprint == read_manifest(directory).fingerprint
    assert fetch.path(names[0]) is None
    fetch.want(names[:2])
    for name in names[:2]:
        path = wait_for(lambda name=name: fetch.path(name), timeout=30, what=f"{name} fetched", poll=0.05)
        assert path.read_bytes() == (directory / name).read_bytes()
    assert not list(fetch.directory.glob("*.partial")) and fetch.path(names[2]) is None  # only those asked for
    # an interrupted download goes on from where it stopped, with a Range request
    whole = (directory / names[3]).read_bytes()
    (fetch.directory / f"{names[3]}.partial").write_bytes(whole[:1000])
    assert fetch.fetch_now(names[3]).read_bytes() == whole
    assert ranges[-1] == "bytes=1000-"


def test_a_damaged_shard_is_refused_and_named_once(published, tmp_path: Path) -> None:
    url, directory, _ = published
    fetch = ShardFetch(url, tmp_path / "cache", 10**9, log=(said := []).append)
    name = fetch.manifest.train[0].name
    damaged = bytearray((directory / name).read_bytes())
    damaged[5] ^= 1
    (directory / name).write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="does not match the manifest's size and sha256"):
        fetch.fetch_now(name)
    assert fetch.path(name) is None and not list(fetch.directory.glob("*.partial"))
    fetch.want([name])
    wait_for(lambda: said, timeout=30, what="the problem said", poll=0.05)
    assert len(said) == 1 and said[0].startswith(f"data: cannot fetch {name} from {url}"), said


def test_the_cache_keeps_to_its_size_but_never_drops_a_shard_in_use(published, tmp_path: Path) -> None:
    url, _, _ = published
    shard_bytes = (1 << 17) * 2
    fetch = ShardFetch(url, tmp_path / "cache", 2 * shard_bytes)
    names = [s.name for s in fetch.manifest.train][:4]
    forgotten: list[str] = []
    fetch.on_evict.append(forgotten.append)

    def cached() -> list[str]:
        return sorted(p.name for p in fetch.directory.glob("train-*.tokens"))
    for i, name in enumerate(names):
        fetch.want([name])  # one at a time in use, as a worker moves through its ranges
        wait_for(lambda i=i: cached() == sorted(names[max(0, i - 1) : i + 1]), timeout=30,
                 what=f"{name} fetched and the cache within its size", poll=0.05)
    assert forgotten == names[:2]  # the least recently used went first, and its map is let go


def test_the_data_files_serve_only_what_the_manifest_names(published) -> None:
    url, _, _ = published
    for bad in ("../manifest.json", "prepare-state.json", "", "train-00000.tokens.partial"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + bad, timeout=10)
        assert err.value.code == 404, bad
    request = urllib.request.Request(url + "train-00000.tokens", headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 206 and len(reply.read()) == 10
        assert reply.headers["Content-Range"].startswith("bytes 10-19/")
    for bad in ("bytes=19-10", "bytes=999999999-", "lines=1-2"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url + "train-00000.tokens", headers={"Range": bad}),
                                   timeout=10)
        assert err.value.code == 416, bad


def test_a_manifest_naming_a_path_outside_the_cache_is_refused(published, tmp_path: Path) -> None:
    url, directory, _ = published
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["train"][0]["name"] = "../../escape.tokens"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"'../../escape.tokens' is not a train shard's name"):
        ShardFetch(url, tmp_path / "cache", 10**9)


def test_an_unreachable_url_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^data.url: cannot read http://127.0.0.1:9/x/manifest.json \(.*\): check"):
        ShardFetch("http://127.0.0.1:9/x", tmp_path / "cache", 10**9)


def test_an_epoch_order_covers_every_sequence_once_and_keeps_a_range_in_one_shard() -> None:
    counts = [500, 0, 730, 260, 512]
    order = EpochOrder(counts, seed=4, epoch=2)
    ids = order.ids(np.arange(order.size))
    assert sorted(ids.tolist()) == list(range(sum(counts)))
    firsts = np.concatenate([[0], np.cumsum(counts)])
    for start in range(0, order.size - 32, 32):  # a range of 32 positions: one shard, or two at a boundary
        shards = order.shards(start, 32)
        owners = {int(np.searchsorted(firsts, i, side="right") - 1) for i in order.ids(np.arange(start, start + 32))}
        assert owners == set(shards) and 1 <= len(shards) <= 2
    assert not np.array_equal(ids, EpochOrder(counts, seed=4, epoch=3).ids(np.arange(order.size)))
    assert np.array_equal(ids, EpochOrder(counts, seed=4, epoch=2).ids(np.arange(order.size)))
