"""Fixtures every test module may use. Test modules never import each other: what they share
lives in tests/harness/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import processes
from tests.harness.coordinator_process import CoordinatorProcess
from tests.harness.worker_process import Workers

pytest_plugins = ["tests.harness.fault_report"]  # the fault suite's report: `pytest -m fault`


@pytest.fixture(scope="session", autouse=True)
def reap_children() -> Iterator[None]:
    """At the end of the run, SIGKILL every process a test started and is still there (with its
    process group: P2P daemons, DHT processes), so that no failed test leaves a swarm running."""
    yield
    processes.reap_all()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """The `worker` processes a test starts (`workers.spawn(...)`), traces in its tmp_path; every
    one is reaped at the end."""
    started = Workers(tmp_path)
    yield started
    started.kill_all()


@pytest.fixture
def coordinators() -> Iterator[list[CoordinatorProcess]]:
    """The coordinator processes a test starts and appends here; every one is killed at the end."""
    started: list[CoordinatorProcess] = []
    yield started
    for process in started:
        process.kill()

