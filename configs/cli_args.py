"""Command-line plumbing shared by `coordinator` and `worker`: --config, --set, --version."""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

from configs.loader import ConfigError, list_presets, load_config
from configs.schema import RunConfig
from configs.version import SOFTWARE_VERSION


def add_config_arguments(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    parser.add_argument(
        "--config",
        default=default,
        metavar="FILE|PRESET",
        help=f"run config: a YAML file or a preset ({', '.join(list_presets())})"
        + (f"; default {default}" if default else ""),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set training.batch_size=32 (repeatable)",
    )


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s (swarmtrain) {SOFTWARE_VERSION}")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Load and validate the config named on the command line, or exit with its problems."""
    if args.config is None:
        fail("--config is required: a YAML file or a preset name such as 'tiny'")
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        fail(str(err), prefix="config error")


def fail(message: str, *, prefix: str = "error", code: int = 2) -> NoReturn:
    """Print one line per problem to stderr and exit; no traceback for a user's mistake."""
    for line in message.splitlines():
        print(f"{prefix}: {line}", file=sys.stderr)
    sys.exit(code)


_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


def is_endpoint(value: str) -> bool:
    """HOST:PORT with a port in 1..65535 (pure): what --coordinator takes on both sides."""
    match = _ENDPOINT.match(value)
    return bool(match) and 1 <= int(match.group(2)) <= 65535

