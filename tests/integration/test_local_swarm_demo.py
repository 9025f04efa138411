"""The README's first command: deploy/local_swarm.py runs a whole swarm and ends with its summary."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.training]  # a whole local swarm

ROOT = Path(__file__).resolve().parents[2]


def test_the_local_swarm_demo_trains_and_summarises(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local_swarm.py"), "--workers", "2", "--seconds", "8",
         "--logs", str(tmp_path)],
        capture_output=True, text=True, timeout=240, check=False, start_new_session=True,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert re.search(r"· [\d,]+ tok/s · loss [\d.]+ · workers per stage: stage 0: 1, stage 1: 1$", out, re.M), out
    done = re.search(r"^done: ([\d,]+) tokens trained by 1 \+ 1 workers in 2 stages · ([\d,]+) tok/s$", out, re.M)
    assert done and int(done.group(1).replace(",", "")) > 0, out
    loss = re.search(r"^loss: validation ([\d.]+) \(the seed's model\) -> ([\d.]+) \(the swarm's\)", out, re.M)
    assert loss and float(loss.group(2)) < float(loss.group(1)), out
    traffic = re.search(r"^traffic: [\d,.]+ MB sent \(.*activations.*\) · ([\d,]+) bytes per trained token$", out, re.M)
    assert traffic and int(traffic.group(1).replace(",", "")) > 0, out
    assert "Traceback" not in out, out
    for name in ("coordinator.log", "worker0.log", "worker1.log"):  # the logs it names are there
        assert (tmp_path / name).stat().st_size > 0
    survivors = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False)
    assert survivors.stdout == "", survivors.stdout  # every process it started has stopped
