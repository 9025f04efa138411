"""Volunteers behind home routers: the coordinator dials back what each worker announces.

On a real NAT bed (tests/harness/natbed.py: network namespaces, a public bridge, home routers
that masquerade and let nothing in, each fact checked as the bed is built): the coordinator on
public host pub0, a worker on public host pub1, a worker in home1 behind a plain router, and a
worker in home2 whose router forwards a port, started with `--public-addr`. The coordinator's
dial-back finds pub1's and home2's data planes reachable and home1's not; home1's worker says so
in one line with what to do; `coordinator status --json` and /metrics show all three.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.natbed import NatBed
from tests.harness.swarm import TRAINING_PACE
from tests.harness.worker_process import WorkerProcess

pytestmark = [pytest.mark.multiprocess, pytest.mark.training, pytest.mark.timeout(300)]

UP_S = 120.0  # three workers importing torch and probing their hardware on two shared cores
FORWARDED = 31330


@pytest.fixture
def bed() -> Iterator[NatBed]:
    built = NatBed(publics=2, homes=2).create()
    yield built
    built.destroy()


def status(bed: NatBed, endpoint: str) -> dict:
    done = subprocess.run(["ip", "netns", "exec", bed.ns("pub1"), sys.executable, "-m", "coordinator.app.cli",
                           "status", "--coordinator", endpoint, "--json"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_coordinator_tells_reachable_workers_from_those_behind_a_closed_router(
    bed: NatBed, tmp_path: Path
) -> None:
    coordinator = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE, "--host", "0.0.0.0", "--announce-host",
                                     bed.address("pub0"), namespace=bed.ns("pub0"))
    public_addr = bed.forward(2, FORWARDED)
    common = ("--coordinator", coordinator.endpoint, "--host", "0.0.0.0", "--link-mbps", "100")
    workers = {
        "pub1": WorkerProcess(*common, trace_dir=tmp_path, namespace=bed.ns("pub1")),
        "home1": WorkerProcess(*common, trace_dir=tmp_path, namespace=bed.ns("home1")),
        "home2": WorkerProcess(*common, "--public-addr", public_addr, trace_dir=tmp_path, namespace=bed.ns("home2")),
    }
    try:
        ids = {name: w.wait_event("assigned", timeout=UP_S)["worker_id"] for name, w in workers.items()}

        def verdicts() -> dict[str, str] | None:
            found = {w["worker_id"]: w["reachability"] for w in status(bed, coordinator.endpoint)["workers"]}
            named = {name: found.get(worker_id, "unknown") for name, worker_id in ids.items()}
            return named if "unknown" not in named.values() else None
        assert wait_for(verdicts, timeout=60, what="every worker dialled back", poll=1.0) == {
            "pub1": "direct", "home1": "unreachable", "home2": "direct"}

        home1 = workers["home1"]
        advice = wait_for(lambda: next((l for l in home1.lines if "could not connect to this worker" in l), None),
                          timeout=60, what="the unreachable worker's advice")
        assert advice.startswith("warning: the coordinator could not connect to this worker (/ip4/"), advice
        assert "--public-addr YOUR_PUBLIC_IP:" in advice and "192.168.1.2" in advice
        assert not any("could not connect" in l for name in ("pub1", "home2") for l in workers[name].lines)
        assert home1.wait_event("dialled_back")["reachable"] is False

        metrics_url = coordinator.line_matching(r"^metrics: http://").split()[-1]
        scraped = subprocess.run(["ip", "netns", "exec", bed.ns("pub1"), sys.executable, "-c",
                                  f"import urllib.request; print(urllib.request.urlopen({metrics_url!r}).read().decode())"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
        counts = dict(re.findall(r'^swarmtrain_worker_reachability\{reachability="(\w+)"\} (\S+)', scraped, re.MULTILINE))
        assert float(counts["direct"]) == 2 and float(counts["unreachable"]) == 1, counts
    finally:
        for worker in workers.values():
            worker.kill()
        coordinator.kill()
