"""A swarm of workers that say their link is thin (--link-mbps 20) trains with the slow-link
settings: compressed activations, stage 0's step cut 4+8+4, and paced averaging rounds.

The link is declared, not shaped (tests/benchmarks/bench_slow_links.py shapes real links): this
checks that the thin-link code paths of a real swarm train, as the fast-link tests do theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.coordinator_process import CoordinatorProcess, wait_for
from tests.integration.test_worker_joins import ASSIGNED, SMALL, WorkerProcess, spawn, workers  # noqa: F401
from worker.trace import read_trace

CUT = r"^stage 0 microbatches 4\+8\+4 per step: one of 8 takes (\d+) ms to cross the link"


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state")
    yield process
    process.kill()


def test_a_swarm_on_declared_thin_links_cuts_its_steps_and_trains(
    coordinator: CoordinatorProcess, workers: list[WorkerProcess], tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    traces = [tmp_path / f"worker{i}.jsonl" for i in range(2)]
    for trace in traces:
        spawn(workers, "--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL,
              "--link-mbps", "20", "--trace", str(trace))
    stages = {int(w.wait_line(ASSIGNED, timeout=60).group(1)): w for w in workers}
    assert sorted(stages) == [0, 1]
    # 8 x 128 tokens of 128 values: ~29 ms at 20 Mbit/s in 4-bit, ~105 ms in float16
    assert 20 <= int(stages[0].wait_line(CUT, timeout=60).group(1)) <= 110

    def steps() -> list[dict] | None:
        found = [e for t in traces if t.exists() for e in read_trace(t) if e["event"] == "step"]
        return found if len(found) >= 30 else None

    trained = wait_for(steps, timeout=120, what="30 steps of stage 0")
    assert all(e["samples"] == 16 for e in trained)  # every step is still 16 sequences
    first, last = sum(e["loss"] for e in trained[:5]) / 5, sum(e["loss"] for e in trained[-5:]) / 5
    assert last < first - 0.5, (first, last)  # byte-level loss starts near 5.5 and falls fast
