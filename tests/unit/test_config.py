"""RunConfig: presets load, overrides apply, and every bad config is one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from configs.loader import ConfigError, apply_override, list_presets, load_config


def test_presets_load_and_match_gptj_6b() -> None:
    assert {"tiny", "gptj-6b"} <= set(list_presets())
    gptj = load_config("gptj-6b").model
    assert (gptj.n_layer, gptj.d_model, gptj.n_head, gptj.rotary_dim, gptj.vocab_size, gptj.n_ctx) == (
        28, 4096, 16, 64, 50400, 2048,
    )
    assert gptj.inner_dim == 4 * 4096
    tiny = load_config("tiny")
    assert tiny.model.head_dim == tiny.model.d_model // tiny.model.n_head


def test_overrides_are_typed_yaml_values() -> None:
    config = load_config(
        "tiny",
        ["training.batch_size=32", "training.learning_rate=1e-3", "data.paths=[a.txt, b.jsonl]",
         "coordinator.join_token=s3cret", "training.grad_clip=null"],
    )
    assert config.training.batch_size == 32
    assert config.training.learning_rate == pytest.approx(1e-3)  # YAML 1.2 float, not a string
    assert config.data.paths == ["a.txt", "b.jsonl"]
    assert config.coordinator.join_token == "s3cret"
    assert config.training.grad_clip is None


def test_fingerprint_follows_the_run_not_the_deployment() -> None:
    base = load_config("tiny").fingerprint()
    assert load_config("tiny", ["coordinator.grpc_port=1234", "worker.public_name=alice"]).fingerprint() == base
    assert load_config("tiny", ["model.n_layer=5"]).fingerprint() != base
    assert load_config("tiny", ["training.seed=7"]).fingerprint() != base
    # the budget says where the run ends: a restart that raises it continues the same run
    assert load_config("tiny", ["training.total_tokens=2000000"]).fingerprint() == base


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.n_head=3", "model.d_model: must be divisible by n_head=3 (got 128)"),
        ("model.rotary_dim=64", "model.rotary_dim: must be <= head dim d_model/n_head = 32 (got 64)"),
        ("model.rotary_dim=15", "model.rotary_dim: must be even"),
        ("training.batch_size=0", "training.batch_size: input should be greater than 0 (got 0)"),
        ("training.batch_size=12", "training.batch_size: must be a multiple of micro_batch_size=8 (got 12)"),
        ("training.micro_batch_size=-4", "training.micro_batch_size: input should be greater than 0 (got -4)"),
        ("training.seq_len=1024", "training.seq_len: must be <= model.n_ctx=256 (got 1024)"),
        ("training.learning_rate=fast", "training.learning_rate: input should be a valid number (got 'fast')"),
        ("model.n_layers=3", "model.n_layers: unknown key; did you mean 'n_layer'?"),
        ("trainng.seed=1", "trainng: unknown key"),
        ("model.n_layer=true", "model.n_layer: input should be a valid integer (got True)"),
        ("model.n_layer='4'", "model.n_layer: input should be a valid integer (got '4')"),
        ("model.vocab_size=100", "model.vocab_size: must be >= 256 for the byte tokenizer (got 100)"),
        ("coordinator.heartbeat_timeout_s=0.5", "coordinator.heartbeat_timeout_s: must exceed heartbeat_interval_s"),
        ("coordinator.grpc_port=70000", "coordinator.grpc_port: input should be less than or equal to 65535"),
        ("coordinator.run_id=has space", "coordinator.run_id: string should match pattern"),
        ("training.precision=fp8", "training.precision: input should be 'fp32', 'bf16' or 'fp16'"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [override])
    assert len(caught.value.problems) == 1, caught.value.problems
    assert expected in caught.value.problems[0]


def test_bad_yaml_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 4\n   d_model: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        load_config(str(bad))


def test_missing_sections_and_files_are_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError) as caught:
        load_config(str(empty))
    assert sorted(caught.value.problems) == [
        f"{empty}: model: required but not set",
        f"{empty}: training: required but not set",
    ]
    with pytest.raises(ConfigError, match="no-such.yaml: no such config file"):
        load_config(str(tmp_path / "no-such.yaml"))
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_override({}, "training.batch_size")
    with pytest.raises(ConfigError, match="model.n_layer is a value, not a section"):
        apply_override({"model": {"n_layer": 4}}, "model.n_layer.x=1")


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.app.cli", *args], capture_output=True, text=True, timeout=60)


def test_coordinator_refuses_a_bad_config_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text(Path(load_config.__code__.co_filename).with_name("tiny.yaml").read_text().replace(
        "n_head: 4", "n_head: 5"))
    result = _run_cli("--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config error: {bad}: model.d_model: must be divisible by n_head=5 (got 128)"
    ]
    assert "Traceback" not in result.stderr


def test_coordinator_accepts_and_summarises_a_good_config() -> None:
    result = _run_cli("--config", "gptj-6b", "--check")
    assert result.returncode == 0, result.stderr
    assert "6.05B parameters" in result.stdout
    assert "config ok" in result.stdout
