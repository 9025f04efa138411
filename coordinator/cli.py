"""`coordinator`: the operator's command."""

from __future__ import annotations

import argparse
import sys

from configs.cli_args import add_config_arguments, add_version_argument, config_from_args
from configs.profile import model_profile, total_params
from configs.schema import RunConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator",
        description="Admit volunteer workers, plan pipeline stages and watch a swarmtrain run.",
    )
    add_version_argument(parser)
    add_config_arguments(parser)
    parser.add_argument("--check", action="store_true", help="validate the config, print its summary and exit")
    return parser


def describe_run(config: RunConfig) -> str:
    """A few lines an operator reads to confirm the config is the run they meant."""
    m, t = config.model, config.training
    profile = model_profile(m, t.precision)
    block = profile.blocks[0]
    params = total_params(m)
    return "\n".join(
        [
            f"run {config.coordinator.run_id} · config {config.fingerprint()}",
            f"model: GPT-J, {_count(params)} parameters ({params:,}) · {m.n_layer} layers · "
            f"d_model {m.d_model} · {m.n_head} heads · rotary {m.rotary_dim} · vocab {m.vocab_size} · "
            f"context {m.n_ctx}",
            f"per layer: {_count(block.params)} parameters · {block.train_memory_bytes / 1e9:.3g} GB to train "
            f"at {t.precision} · {block.activation_bytes_per_token:,} B/token across a stage boundary",
            f"training: {t.total_tokens:,} tokens · batch {t.batch_size}×{t.seq_len} · "
            f"{6 * params * t.total_tokens:.2e} FLOPs",
        ]
    )


def _count(n: float) -> str:
    """6050882784 -> '6.05B', 856064 -> '856K': how people say model sizes."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(int(n))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    print(describe_run(config))
    print("config ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
