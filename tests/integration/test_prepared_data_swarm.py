"""A swarm on prepared data: the coordinator hands stage 0 its sequences, each once per epoch.

Real processes: `coordinator data prepare`'s shards of the embedded corpus published by Python's
own HTTP server (`data.url`), a coordinator that hands them out in ranges of two steps
(`data.handout_steps=2`), two workers that are both replicas of tiny's one stage and fetch the
shards they train into caches of their own. One worker is SIGKILLed mid-run and the coordinator
is `kill -9`ed and restarted on its state and port. Then:
- the sequences the workers' traces say were trained (the spans the coordinator acknowledged)
  hold no position of an epoch twice;
- the coordinator's ledger (its SQLite table) tiles each epoch's handed-out positions with no
  overlap and no gap, covers every traced position, and holds nothing for the dead worker: what
  it had not reported trained went back to be handed out again;
- the survivor trains on after the restart, from the ledger the restarted coordinator read back;
- each worker fetched only some of the shards, each checked against the manifest;
- the coordinator's /metrics shows how far the epoch is handed out, and its /data/ serves the files.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from itertools import pairwise
from pathlib import Path

import pytest

from configs.schema import DataConfig
from coordinator.data.prepare import prepare
from coordinator.storage.join_tokens import REGISTRY_FILE
from protos import swarmtrain_pb2 as pb
from tests.harness import processes
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.swarm import TRAINING_PACE, free_port
from tests.harness.worker_process import Workers
from worker.telemetry.trace import read_trace

pytestmark = [pytest.mark.multiprocess, pytest.mark.training, pytest.mark.timeout(600)]

UP_S = 120.0  # two workers starting, joining and building on two shared cores


def spans(trace: Path, since: float = 0.0) -> list[dict]:
    return [e for e in read_trace(trace) if e["event"] == "data_trained" and e["time"] >= since] if trace.exists() else []


def ledger_rows(state: Path) -> list[tuple[int, int, int, int, int, str]]:
    db = sqlite3.connect(state / REGISTRY_FILE)
    try:
        return db.execute("SELECT range_id, epoch, start, end, trained, worker_id FROM data_ranges").fetchall()
    finally:
        db.close()


def test_each_handed_out_sequence_is_trained_once_across_a_killed_replica_and_a_coordinator_restart(
    tmp_path: Path, workers: Workers
) -> None:
    prepared = tmp_path / "prepared"
    manifest = prepare(DataConfig(max_corpus_bytes=3_000_000), prepared, shard_tokens=1 << 18)
    web_port = free_port()
    web = processes.start([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(prepared),
                           str(web_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{web_port}/"
    wait_for(lambda: serves(url), timeout=30, what="the HTTP server publishing the prepared data", poll=0.1)
    port = free_port()  # the restarted coordinator must answer where the first one did
    args = (tmp_path / "state", *TRAINING_PACE, "--grpc-port", str(port), "--set", f"data.prepared={prepared}",
            "--set", "data.handout_steps=2", "--set", f"data.url={url}")
    coordinator = CoordinatorProcess(*args)
    traces = [tmp_path / f"worker{i}.jsonl" for i in range(2)]
    caches = [tmp_path / f"cache{i}" for i in range(2)]
    try:
        for trace, cache in zip(traces, caches, strict=True):
            workers.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1", "--link-mbps", "10000",
                          "--trace", str(trace), "--data-cache", str(cache), "--data-cache-size", "100MB")
        ids = [w.wait_event("assigned", timeout=UP_S)["worker_id"] for w in workers]
        try:
            wait_for(lambda: all(len(spans(t)) >= 2 for t in traces), timeout=UP_S,
                     what="both replicas trained handed-out data", poll=0.25)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n" + "\n".join(w.output[-3000:] for w in workers)) from None
        workers[1].kill()  # SIGKILL, mid-range: what it trained since its last report is lost
        wait_for(lambda: next(w for w in coordinator.swarm().workers if w.worker_id == ids[1]).state
                 == pb.WORKER_STATE_GONE, timeout=30, what="the killed worker marked gone", poll=0.25)
        wait_for(lambda: not [r for r in ledger_rows(tmp_path / "state") if r[5] == ids[1]], timeout=30,
                 what="the dead worker's ranges taken back", poll=0.25)
        coordinator.kill_9()
        restarted_at = time.time()
        coordinator = CoordinatorProcess(*args)
        try:
            wait_for(lambda: len(spans(traces[0], since=restarted_at)) >= 3, timeout=UP_S,
                     what="the survivor training handed-out data after the restart", poll=0.25)
        except TimeoutError as err:
            raise AssertionError(f"{err}\n{workers[0].output[-3000:]}\n{coordinator.output[-3000:]}") from None
        metrics_url = coordinator.line_matching(r"^metrics: http://").split()[-1]
        with urllib.request.urlopen(metrics_url, timeout=10) as reply:
            metrics = reply.read().decode()
        handed = re.search(r"^swarmtrain_data_epoch_handed_out (\S+)", metrics, re.MULTILINE)
        assert handed and 0 < float(handed.group(1)) <= 1, "the ledger's progress is not in /metrics"
        # the coordinator serves the same files itself, for runs without a data.url
        with urllib.request.urlopen(metrics_url.replace("/metrics", "/data/manifest.json"), timeout=10) as reply:
            assert reply.read() == (prepared / "manifest.json").read_bytes()
    finally:
        workers.kill_all()
        coordinator.kill()
        processes.reap(web)

    print(f"{sum(len(spans(t)) for t in traces)} spans acknowledged, {len(ledger_rows(tmp_path / 'state'))} ranges")
    trained: dict[int, list[int]] = {}  # epoch -> positions, from every trace
    for trace in traces:
        for span in spans(trace):
            trained.setdefault(span["epoch"], []).extend(range(span["start"], span["end"]))
    for epoch, positions in trained.items():
        assert len(positions) == len(set(positions)), f"epoch {epoch}: a position trained twice"
    assert sum(map(len, trained.values())) >= 7 * 32  # seven spans of a range (2 steps x 16 sequences)

    rows = ledger_rows(tmp_path / "state")
    assert not [r for r in rows if r[5] == ids[1]], "the dead worker still holds ranges"
    recorded: dict[int, set[int]] = {}
    for epoch in {r[1] for r in rows}:
        ranges = sorted((r for r in rows if r[1] == epoch), key=lambda r: r[2])
        assert ranges[0][2] == 0
        for a, b in pairwise(ranges):
            assert a[3] == b[2], f"epoch {epoch}: ranges {a} and {b} overlap or leave a gap"
        recorded[epoch] = {p for r in ranges for p in range(r[2], r[2] + r[4])}
    for epoch, positions in trained.items():
        assert set(positions) <= recorded.get(epoch, set()), "a traced position the ledger did not record"

    shards = {s.name: s.sha256 for s in manifest.train}
    for i, cache in enumerate(caches):
        fetched = list((cache / manifest.fingerprint).glob("train-*.tokens"))
        print(f"worker {i} fetched {len(fetched)} of {len(shards)} train shards")
        assert fetched and len(fetched) < len(shards), (len(fetched), len(shards))  # what it trained, not all
        for path in fetched:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shards[path.name]


def serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "manifest.json", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False
