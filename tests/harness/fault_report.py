"""The fault suite's report (a pytest plugin, loaded by tests/conftest.py).

A test marked `@pytest.mark.fault("what goes wrong")` is one fault tried, with real processes;
the swarm survived it when the test passed. The description may name the test's parameters
(`"a second coordinator on a live one's {which} port"`). A test that measures what the fault
cost calls the `fault_cost` fixture with the trained tokens the swarm lost or undid.

`pytest -m fault --fault-report FILE` (or `deploy/quickstart.sh faults`) ends with one line per
fault and the totals, and writes them to FILE as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

RESULTS: list[dict[str, Any]] = []  # one per fault test run in this process (xdist: the controller's)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fault-report", type=Path, default=None, metavar="FILE",
                     help="write the fault suite's results (tests marked `fault`) to FILE as JSON")


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("fault")
    if marker is not None:
        params = getattr(getattr(item, "callspec", None), "params", {})
        item.user_properties.append(("fault", str(marker.args[0]).format(**params)))


@pytest.fixture
def fault_cost(request: pytest.FixtureRequest) -> Callable[[int], None]:
    """Record the trained tokens this fault cost the swarm (lost or rolled back)."""
    def record(tokens_lost: int) -> None:
        request.node.user_properties.append(("tokens_lost", int(tokens_lost)))
    return record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    properties = dict(report.user_properties)
    if "fault" not in properties or report.skipped or not (report.when == "call" or report.failed):
        return  # one result per test: its call, or the setup/teardown that failed instead
    RESULTS[:] = [r for r in RESULTS if r["test"] != report.nodeid]  # a teardown failure overrides
    RESULTS.append({"fault": properties["fault"], "test": report.nodeid, "survived": report.passed,
                    "tokens_lost": properties.get("tokens_lost"), "seconds": round(report.duration, 1)})


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = RESULTS
    if not results:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault suite")
    for r in sorted(results, key=lambda r: r["fault"]):
        lost = "" if r["tokens_lost"] is None else f" · {r['tokens_lost']:,} tokens lost"
        write(f"{'survived' if r['survived'] else 'FAILED  '} · {r['fault']}{lost} · {r['seconds']:.0f}s")
    survived = sum(r["survived"] for r in results)
    lost = sum(r["tokens_lost"] or 0 for r in results)
    write(f"{len(results)} faults tried, {survived} survived, {lost:,} trained tokens lost or rolled back")
    path = config.getoption("--fault-report")
    if path is not None:
        summary = {"tried": len(results), "survived": survived, "tokens_lost": lost, "faults": results}
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(summary, indent=2) + "\n")
        partial.replace(path)  # never a half-written report under its name
        write(f"fault report: {path}")
