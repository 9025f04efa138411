"""`coordinator plan`: the offline cost report, and one error line (exit 2) for every bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs.catalog import load_catalog
from configs.fleet import load_fleet
from configs.loader import load_config
from configs.profile import model_profile
from coordinator.costs.model import layers_that_fit

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "configs" / "fleets" / "consumer-64.yaml"
GPTJ_PARAMS = 6_050_882_784


def plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.app.cli", "plan", *args], check=False,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def row(stdout: str, label: str) -> list[str]:
    """The cells of the comparison row starting with `label`, split on runs of 2+ spaces."""
    [line] = [ln for ln in stdout.splitlines() if ln.startswith(f"  {label}")]
    return re.split(r"\s{2,}", line.strip())[1:]


def number(cell: str) -> float:
    return float(re.sub(r"[^0-9.e+-]", "", cell))


@pytest.fixture(scope="module")
def gptj_report() -> str:
    result = plan("--config", "gptj-6b", "--tokens", "3.53e9", "--fleet", str(FLEET), "--datacenter", "A100-80GB:8")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_the_report_gives_parameters_flops_and_memory(gptj_report: str) -> None:
    assert "6.05B parameters (6,050,882,784)" in gptj_report
    assert "training: 3,530,000,000 tokens" in gptj_report
    assert "1.28e+20 FLOPs" in gptj_report  # 6 x 6.0509e9 x 3.53e9
    assert "inference: 1.21e+10 FLOPs per token" in gptj_report  # 2 x 6.0509e9
    assert "16 B/parameter = weights 2 + gradients 2 + fp32 master 4 + Adam 8" in gptj_report
    # 16 x 201,355,264 B = 3.00 GiB per layer; 16 x 6,050,882,784 B = 90.2 GiB in all
    assert re.search(r"per layer\s+201M parameters\s+3\.00 GiB", gptj_report)
    assert re.search(r"whole model\s+6\.05B parameters\s+90\.2 GiB", gptj_report)


def test_the_report_says_how_many_layers_each_catalog_gpu_holds(gptj_report: str) -> None:
    catalog = load_catalog()
    config = load_config("gptj-6b")
    profile = model_profile(config.model, "bf16", config.training)  # counted at the run's peak
    for gpu in catalog:
        [line] = [ln for ln in gptj_report.splitlines() if ln.startswith(f"  {gpu.id} ")]
        cells = line.split()
        fit = layers_that_fit(profile, gpu.memory_bytes)
        assert [int(c) for c in cells[-4:-1]] == [fit.middle, fit.first, fit.last], line
        assert 0 < fit.middle < gpu.memory_bytes // (16 * 201_355_264), line  # fewer than 16 B/param alone
        assert cells[-1] == "no"  # no catalog card holds GPT-J's 96.8 GB alone


def test_the_fleet_plan_covers_every_layer_once(gptj_report: str) -> None:
    stages = [ln.split() for ln in gptj_report.splitlines() if re.match(r"^\s+\d+\s+\d+(-\d+)? \(\d+\)", ln)]
    assert stages
    covered = []
    for cells in stages:
        first, _, last = cells[1].partition("-")
        covered += range(int(first), int(last or first) + 1)
    assert covered == list(range(28))
    used = sum(int(n) for cells in stages for n in re.findall(r"(\d+)×", " ".join(cells[9:])))
    idle = int(re.search(r"(\d+) idle", gptj_report).group(1))
    assert used + idle == 64


def test_the_fleet_plan_shows_each_stages_margins(gptj_report: str) -> None:
    rows = [ln for ln in gptj_report.splitlines() if re.match(r"^\s+\d+\s+\d+(-\d+)? \(\d+\)", ln)]
    flagged = []
    for line in rows:
        m = re.search(r"GiB\s+(\d+)%(!?)\s+[\d,]+\s+(\d+)%\s+(compute|link)\s", line)
        assert m, line
        memory, tight, link = int(m.group(1)), m.group(2) == "!", int(m.group(3))
        # a plan never overfills a card (at its stage's whole peak) or a link
        assert 0 < memory <= 100 and 0 <= link <= 100, line
        assert (memory >= 90) if tight else (memory <= 90), line  # flag and figure agree (rounded to 1%)
        if tight:
            flagged.append(line.split()[0])
    if flagged:
        assert f"! stage{'s' if len(flagged) > 1 else ''} {', '.join(flagged)} peak above 90%" in gptj_report
    assert re.search(r"host RAM: .* up to [\d.]+ GiB", gptj_report)


def test_the_comparison_matches_the_closed_forms(gptj_report: str) -> None:
    catalog = load_catalog()
    a100 = catalog.get("A100-80GB")
    swarm_rate, dc_rate = (number(c) for c in row(gptj_report, "tokens/s"))
    # 8 x 312 TFLOP/s x 0.4 / (6 x 6.0509e9 FLOPs/token) = 27,500 tokens/s
    dc_expected = 8 * a100.peak("bf16") * 0.4 / (6 * GPTJ_PARAMS)
    assert abs(dc_rate / dc_expected - 1) < 1e-4
    hours = 3.53e9 / dc_expected / 3600  # 35.7 h
    _, dc_wall = row(gptj_report, "wall time")
    assert dc_wall == f"{hours:.1f} h"
    _, dc_rent = row(gptj_report, "rent at hourly prices")
    assert abs(number(dc_rent) / (hours * 8 * a100.usd_per_hour) - 1) < 0.01
    _, dc_kwh = row(gptj_report, "energy (GPU board power)")
    assert abs(number(dc_kwh) / (hours * 8 * a100.board_power_watts / 1000) - 1) < 0.01
    # the swarm cannot beat its summed compute, nor its slowest stage; it trains what the pipeline
    # line says: that stage's rate at the share the schedule keeps of it
    fleet = load_fleet(FLEET, catalog)
    bound = sum(g.count * g.gpu.peak("bf16") * 0.4 for g in fleet) / (6 * GPTJ_PARAMS)
    line = re.search(r"expected ([\d,]+) tokens/s, (\d+)% of the slowest stage's ([\d,]+)", gptj_report)
    assert line, gptj_report
    expected, share, slowest = number(line.group(1)), int(line.group(2)), number(line.group(3))
    assert swarm_rate == expected and expected <= slowest <= bound * 1.0001
    assert abs(expected / slowest - share / 100) < 0.006
    # 4 micro-batches in flight cannot fill 13 stages: the report says how many would
    hint = re.search(r"! 4 micro-batches in flight .* about (\d+) would fill this pipeline", gptj_report)
    assert share < 80 and hint and int(hint.group(1)) > 4
    swarm_wall, _ = row(gptj_report, "wall time")
    hours = number(swarm_wall) * (24 if swarm_wall.endswith("days") else 1)
    assert abs(hours / (3.53e9 / swarm_rate / 3600) - 1) < 0.02  # shown to one decimal


def test_without_a_fleet_the_config_budget_is_priced_in_the_datacenter() -> None:
    result = plan("--config", "tiny", "--mfu", "0.5", "--datacenter", "RTX-4090:2")
    assert result.returncode == 0, result.stderr
    assert "swarm:" not in result.stdout
    [rate] = (number(c) for c in row(result.stdout, "tokens/s"))
    # tiny: 856,064 parameters at fp32 on 2 x 82.6 TFLOP/s x 0.5, 1,000,000 tokens (its total_tokens)
    assert abs(rate / (2 * 82.6e12 * 0.5 / (6 * 856_064)) - 1) < 1e-4
    assert "for 1M tokens" in result.stdout


def _one_error_line(result: subprocess.CompletedProcess[str], prefix: str, *needles: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(prefix), line
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("text, needles", [
    ("- gpu: RTX-9999\n  count: 4\n  link_mbps: 1000\n", ["entry 1 (RTX-9999): gpu: unknown GPU 'RTX-9999'"]),
    ("- gpu: RTX-3090\n  count: 4\n", ["entry 1 (RTX-3090): link_mbps: required but not set"]),
    ("- gpu: RTX-3090\n  count: -4\n  link_mbps: 1000\n", ["count: input should be greater than 0"]),
    ("gpu: RTX-3090\n", ["expected a non-empty list of entries"]),
    ("- [gpu: RTX-3090\n", ["not valid YAML"]),
])
def test_a_bad_fleet_file_is_one_line_and_exit_2(tmp_path: Path, text: str, needles: list[str]) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text(text)
    _one_error_line(plan("--config", "gptj-6b", "--fleet", str(bad)), f"fleet error: {bad}", *needles)


def test_a_missing_fleet_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    _one_error_line(plan("--config", "tiny", "--fleet", str(missing)), "fleet error:", str(missing), "cannot read")


@pytest.mark.parametrize("args, prefix, needle", [
    (["--datacenter", "B300:8"], "error: --datacenter 'B300:8':", "unknown GPU 'B300'"),
    (["--set", "metrics.datacenter_reference_gpu=B300"], "error: metrics.datacenter_reference_gpu", "B300"),
    (["--datacenter", "A100-80GB:none"], "error: --datacenter", "positive count"),
    (["--datacenter", "RTX-3080:2"], "plan error:", "use at least 11"),  # 96.8 GB over 9.0 GB usable cards
    (["--tokens", "lots"], "error: --tokens", "expected a number of tokens"),
    (["--tokens", "0"], "error: --tokens", "at least 1"),
    (["--mfu", "1.5"], "error: --mfu", "(0, 1]"),
])
def test_bad_flags_are_one_line_and_exit_2(args: list[str], prefix: str, needle: str) -> None:
    _one_error_line(plan("--config", "gptj-6b", *args), prefix, needle)


def test_a_fleet_that_cannot_hold_the_model_is_one_line(tmp_path: Path) -> None:
    small = tmp_path / "small.yaml"
    small.write_text("- gpu: RTX-3060\n  count: 3\n  link_mbps: 100\n")  # 3 x 12 GiB < 96.8 GB
    _one_error_line(plan("--config", "gptj-6b", "--fleet", str(small)), "plan error:", "cannot hold the model")


def test_the_join_command_names_the_device_the_preset_trains_on() -> None:
    from coordinator.app.cli import join_device

    assert join_device(load_config("tiny")) == "--cpu"  # fp32: the CPU presets
    assert join_device(load_config("gptj-6b")) == "--gpu 0"  # bf16
