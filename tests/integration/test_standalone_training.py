"""`worker --standalone`, as a user runs it: trains, reports, and refuses bad input in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess  # `worker --standalone` processes


def run_worker(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.app.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.training
def test_tiny_preset_trains_and_the_validation_loss_falls() -> None:
    result = run_worker(
        "--standalone", "--cpu", "--config", "tiny", "--max-steps", "40",
        "--set", "training.eval_interval_steps=20", "--set", "worker.log_interval_s=0.1",
    )
    assert result.returncode == 0, result.stderr
    done = re.search(r"validation loss ([\d.]+) → ([\d.]+)", result.stdout)
    assert done, result.stdout
    before, after = map(float, done.groups())
    # byte-level cross-entropy starts near ln(256) = 5.55 and a few dozen steps halve it
    assert before > 5.0
    assert after < 0.7 * before
    assert re.search(r"step +\d+/40 · loss [\d.]+ · val [\d.]+ · [\d,]+ tok/s", result.stdout)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "model.n_head=3"], "config error: tiny: model.d_model: must be divisible by n_head=3"),
        (["--set", "data.paths=[does/not/exist.txt]"], "data error: data.paths: does/not/exist.txt does not exist"),
        (["--set", "data.tokenizer=missing/tokenizer.json"], "data error:"),
        (["--gpu", "99"], "error: --gpu 99:"),
        (["--max-steps", "-1"], "error: --max-steps -1: must be 0 (the starting model, e.g. to --export it) or more"),
    ],
)
def test_user_mistakes_get_one_line_and_no_traceback(args: list[str], expected: str) -> None:
    device = [] if "--gpu" in args else ["--cpu"]
    result = run_worker("--standalone", *device, *args, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.training
def test_local_text_files_train(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    result = run_worker(
        "--standalone", "--cpu", "--config", "tiny", "--max-steps", "5", "--set", f"data.paths=[{corpus}]",
    )
    assert result.returncode == 0, result.stderr
    assert "40 documents" in result.stdout
