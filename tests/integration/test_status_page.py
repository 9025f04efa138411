"""The swarm page and `coordinator status` on a live coordinator: the page and its JSON come from
the metrics port, the terminal view over gRPC, and all three agree on the swarm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.browser import Browser
from tests.harness.coordinator_process import CoordinatorProcess, make_profile, wait_for

pytestmark = pytest.mark.multiprocess

NAMES = ["alice", "<img src=x onerror=alert(1)>", ""]


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state")
    yield process
    process.kill()


def fetch(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.headers["Content-Type"], reply.read()


def status_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.app.cli", "status", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_page_its_json_and_the_terminal_view_show_every_worker(coordinator: CoordinatorProcess) -> None:
    page = coordinator.line_matching(r"^swarm page: http://").split()[-1]
    joined = [coordinator.join(make_profile(name=name)) for name in NAMES]
    for j in joined:
        coordinator.beat(j)

    def listed() -> dict | None:
        status = json.loads(fetch(page + ".json")[1])
        return status if len(status["workers"]) == len(NAMES) else None
    status = wait_for(listed, timeout=30, what="every worker on /status.json", poll=0.2)

    kind, html = fetch(page)
    assert kind.startswith("text/html") and b"<title>swarmtrain</title>" in html
    assert {w["public_name"] for w in status["workers"]} == set(NAMES)  # names are data, kept as sent
    assert {w["worker_id"] for w in status["workers"]} == {j.worker_id for j in joined}
    assert status["run"]["run_id"] == "tiny" and status["stages"]

    done = status_cli("--coordinator", coordinator.endpoint, "--json")
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    for key in ("run", "stages"):
        assert cli[key] == status[key], key
    assert set(status) - set(cli) == {"events"}  # what happened between refreshes: the page's alone
    rows = {(w["worker_id"], w["stage"], w["state"], w["public_name"]) for w in cli["workers"]}
    assert rows == {(w["worker_id"], w["stage"], w["state"], w["public_name"]) for w in status["workers"]}

    text = status_cli("--coordinator", coordinator.endpoint)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("run tiny · plan ")
    assert all(j.worker_id in text.stdout for j in joined)


def test_status_of_a_coordinator_that_is_not_there_is_one_line() -> None:
    done = status_cli("--coordinator", "127.0.0.1:1")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: cannot get the swarm from 127.0.0.1:1: unavailable")
    bad = status_cli("--coordinator", "nowhere")
    assert bad.returncode == 2 and bad.stderr.strip() == ("error: --coordinator nowhere: expected HOST:PORT, "
                                                          "e.g. 127.0.0.1:50500")


class Beating:
    """Harness workers that heartbeat every half second until told to stop, one by one."""

    def __init__(self, coordinator: CoordinatorProcess, joined: list) -> None:
        self.coordinator, self.joined = coordinator, joined
        self.stopped: set[str] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.5):
            for j in self.joined:
                if j.worker_id not in self.stopped:
                    self.coordinator.beat(j)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)


def test_the_page_in_a_real_browser_shows_every_worker_names_as_text_and_a_lost_worker_as_gone(
        tmp_path: Path) -> None:
    coordinator = CoordinatorProcess(tmp_path / "state", "--set", "coordinator.heartbeat_interval_s=0.5",
                                     "--set", "coordinator.heartbeat_timeout_s=3")
    beating = None
    try:
        page = coordinator.line_matching(r"^swarm page: http://").split()[-1]
        joined = [coordinator.join(make_profile(name=name)) for name in NAMES]
        beating = Beating(coordinator, joined)
        with Browser() as browser:
            browser.open(page)
            rows = browser.wait_js("document.querySelectorAll('tr[data-worker]').length === 3 && "
                                   "[...document.querySelectorAll('tr[data-worker]')].map(r => r.dataset.worker)",
                                   timeout=30, what="three workers")
            assert set(rows) == {j.worker_id for j in joined}
            assert browser.js("document.querySelectorAll('div[data-stage]').length") >= 1
            names = browser.js("[...document.querySelectorAll('td.name')].map(td => td.textContent)")
            assert NAMES[1] in names  # the markup is shown as the text it is ...
            assert browser.js("document.querySelectorAll('img').length") == 0  # ... and never becomes markup
            if target := os.environ.get("SWARMTRAIN_SCREENSHOT"):  # README's picture of the page
                browser.screenshot(Path(target))
            lost = joined[0].worker_id
            beating.stopped.add(lost)  # it stops heartbeating: the page turns it "gone" without a reload
            started = time.monotonic()
            browser.wait_js(f"document.querySelector('tr[data-worker=\"{lost}\"] td.state')?.textContent === 'gone'",
                            timeout=3 + 10, what=f"{lost} gone")
            assert time.monotonic() - started < 3 + 10
            browser.wait_js(f"document.getElementById('events').textContent.includes('{lost} (alice) is gone')",
                            timeout=10, what="the loss among the events")
            browser.screenshot(tmp_path / "status.png")
            assert (tmp_path / "status.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        if beating is not None:
            beating.close()
        coordinator.kill()
