"""`worker`: the one command a volunteer runs."""

from __future__ import annotations

import argparse
import sys
import time

from configs.cli_args import add_config_arguments, add_version_argument, config_from_args, fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="Train a GPT-J model with a swarmtrain swarm, or alone with --standalone.",
    )
    add_version_argument(parser)
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", type=int, metavar="N", help="train on CUDA device N")
    device.add_argument("--cpu", action="store_true", help="train on the CPU")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="train the whole model in this process, without a swarm (the single-machine reference)",
    )
    add_config_arguments(parser, default="tiny")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        fail(f"--max-steps {args.max_steps}: must be 1 or more")
    config = config_from_args(args)
    if not args.standalone:
        fail("pass --standalone to train on this machine alone; swarm mode needs --peers or --coordinator")
    return run_standalone(config, args)


def run_standalone(config, args: argparse.Namespace) -> int:  # noqa: ANN001 - RunConfig
    # torch and the data stack load in seconds; import them only once the arguments are good.
    from worker.data import DataError, TokenData
    from worker.device import DeviceError, describe_device, resolve_device
    from worker.local_training import format_report, train_locally

    try:
        device = resolve_device(args.gpu, args.cpu)
    except DeviceError as err:
        fail(str(err))
    print(f"device: {describe_device(device)}", flush=True)
    started = time.perf_counter()
    try:
        data = TokenData(config.data, config.training.seq_len, config.training.seed)
    except DataError as err:
        fail(str(err), prefix="data error")
    print(f"data: {data.describe()} (loaded in {time.perf_counter() - started:.1f}s)", flush=True)
    if data.tokenizer.vocab_size > config.model.vocab_size:
        fail(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{data.tokenizer.vocab_size} symbols: raise model.vocab_size",
            prefix="config error",
        )
    try:
        report = train_locally(config, data, device, max_steps=args.max_steps, log=_print_flush)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (FloatingPointError, ValueError) as err:
        fail(str(err), prefix="training error", code=1)
    print(format_report(report), flush=True)
    return 0


def _print_flush(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
