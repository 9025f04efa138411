"""A real Prometheus scrapes a live swarm through the coordinator's service discovery.

A coordinator and two workers train the tiny model; `promtool check metrics` reads the
coordinator's and both workers' endpoints; `promtool check config` reads the shipped
deploy/prometheus/prometheus.yml; then a Prometheus server, configured like it but pointed
at this coordinator, finds the workers through /sd, and every PromQL expression of every
shipped Grafana dashboard must return data (panels described as "GPU only" excepted: no
GPU here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.swarm import TRAINING_PACE, free_port
from tests.harness.worker_process import SMALL, Workers

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
INSTALL_HINT = "install Debian's prometheus package (deploy/quickstart.sh test does, as root)"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: {INSTALL_HINT}")
    return path


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=60, check=False)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every target of every panel, GPU-only panels left out."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = list(dashboard.get("panels", []))
        while panels:
            panel = panels.pop()
            panels.extend(panel.get("panels", []))  # rows may nest panels
            if "GPU only" in panel.get("description", ""):
                continue
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((path.name, panel.get("title", "?"), target["expr"]))
    return found


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE)
    yield process
    process.kill()


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Starts (via the returned `start`) one Prometheus server; it is always stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any]) -> str:
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        checked = subprocess.run([tool("promtool"), "check", "config", str(config_path)], capture_output=True,
                                 text=True, timeout=60, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(subprocess.Popen(
            [tool("prometheus"), f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url, procs[-1]), timeout=60, what="prometheus ready", poll=0.25)
        return url

    yield {"start": start}
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"prometheus exited ({proc.returncode})")
    try:
        return "Ready" in get(f"{url}/-/ready")
    except OSError:
        return False


def query(url: str, expr: str) -> dict[str, Any]:
    return json.loads(get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))


def test_prometheus_scrapes_the_swarm_through_sd_and_every_dashboard_query_has_data(
    coordinator: CoordinatorProcess, workers: Workers, prometheus_server: dict[str, Any]
) -> None:
    assert DASHBOARDS, "no dashboards under deploy/grafana/dashboards"
    queries = dashboard_queries()
    assert len(queries) >= 10, queries

    shipped = subprocess.run([tool("promtool"), "check", "config", str(PROMETHEUS_YML)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr

    metrics_url = coordinator.line_matching(r"^metrics: http://").split()[-1]
    base = metrics_url.removesuffix("/metrics")
    join = ["--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL]
    workers.spawn(*join)
    workers.spawn(*join)
    wait_for(lambda: coordinator.swarm().progress.trained_tokens > 0, timeout=120, what="tokens trained", poll=0.5)
    targets = json.loads(get(f"{base}/sd"))
    assert len(targets) == 2 and all(len(group["targets"]) == 1 for group in targets), targets
    assert {group["labels"]["stage"] for group in targets} == {"0", "1"}, targets

    for url in [metrics_url] + [f"http://{group['targets'][0]}/metrics" for group in targets]:
        text = get(url)
        assert "swarmtrain_" in text, url
        checked = promtool_check_metrics(text)
        assert checked.returncode == 0 and not checked.stdout.strip(), (url, checked.stdout, checked.stderr)

    # the shipped config, pointed at this coordinator, scraping every second
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "evaluation_interval": "1s"}
    host = urllib.parse.urlsplit(metrics_url).netloc
    jobs = config["scrape_configs"]
    for job in jobs:
        job.pop("scrape_interval", None)
        for static in job.get("static_configs", []):
            static["targets"] = [host]
        for sd in job.get("http_sd_configs", []):
            sd["url"] = f"{base}/sd"
            sd["refresh_interval"] = "1s"
    assert any(job.get("http_sd_configs") for job in jobs) and any(job.get("static_configs") for job in jobs)
    prometheus = prometheus_server["start"](config)

    def all_up() -> bool:
        up = query(prometheus, "up")["data"]["result"]
        return len(up) == 3 and all(series["value"][1] == "1" for series in up)
    wait_for(all_up, timeout=60, what="the coordinator and both workers scraped", poll=0.5)

    worker_id = targets[0]["labels"]["worker_id"]
    missing: list[str] = []

    def every_query_has_data() -> bool:
        missing.clear()
        for name, title, expr in queries:
            concrete = expr.replace("$__rate_interval", "30s").replace("$worker", worker_id)
            reply = query(prometheus, concrete)
            assert reply["status"] == "success", (name, title, concrete, reply)
            if not reply["data"]["result"]:
                missing.append(f"{name} · {title}: {concrete}")
        return not missing
    try:
        wait_for(every_query_has_data, timeout=90, what="data for every dashboard query", poll=1.0)
    except TimeoutError as err:
        raise AssertionError(f"{err}; without data:\n" + "\n".join(missing)) from None
