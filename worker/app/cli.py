"""`worker`: the one command a volunteer runs."""

from __future__ import annotations

import os
import signal


def _exit_at_once(_signum: int, _frame: object) -> None:
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


# Ctrl-C while Python loads (torch and gRPC take seconds): nothing runs yet that needs stopping,
# so the worker leaves at once, without a traceback. What runs later sets its own handlers: the
# swarm worker leaves in order (worker/app/lifecycle.py), standalone training reports and stops.
signal.signal(signal.SIGINT, _exit_at_once)

import argparse  # noqa: E402 - after the handler: a Ctrl-C during these imports is honoured too
import ipaddress  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from configs.cli_args import add_config_arguments, add_version_argument, config_from_args, fail, is_endpoint  # noqa: E402
from configs.process_guard import guard_descendants  # noqa: E402

STANDALONE_PRESET = "tiny"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # as configs.schema.CoordinatorConfig.run_id
# Flags that only mean something in one mode, to refuse a command that mixes them.
SWARM_FLAGS = ("run_id", "join_token", "metrics_port", "public_name", "max_memory", "link_mbps", "host", "lie_scale",
               "withhold_rounds", "identity", "pretrained", "data_cache", "data_cache_size", "public_addr")
STANDALONE_FLAGS = ("max_steps", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="Train a GPT-J model with a swarmtrain swarm, or alone with --standalone.",
        epilog="To write a running swarm's model in Hugging Face format: worker export --help",
    )
    add_version_argument(parser)
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", type=int, metavar="N", help="train on CUDA device N")
    device.add_argument("--cpu", action="store_true", help="train on the CPU")

    swarm = parser.add_argument_group(
        "swarm (pass one of --peers or --coordinator; the run config comes from it)")
    swarm.add_argument("--peers", nargs="+", default=[], metavar="MULTIADDR",
                       help="DHT peers to find the coordinator through: the address it printed after 'DHT:'")
    swarm.add_argument("--coordinator", metavar="HOST:PORT",
                       help="the coordinator's gRPC address (skips the DHT)")
    swarm.add_argument("--run-id", metavar="RUN", help="which run to join when several share the peers")
    swarm.add_argument("--join-token", metavar="TOKEN", help="the token the swarm's operator gave, if any")
    swarm.add_argument("--host", metavar="ADDRESS",
                       help="address this worker's data plane listens on (default 0.0.0.0)")
    swarm.add_argument("--metrics-port", type=int, metavar="PORT", help="port of this worker's /metrics")
    swarm.add_argument("--public-name", metavar="NAME", help="a name shown on the swarm's dashboards")
    swarm.add_argument("--max-memory", metavar="SIZE",
                       help="memory a stage may use at most, e.g. 20GB or 512MiB (default: the GPU's, or "
                            "free RAM, less the framework's ~0.4 GiB and on a GPU the CUDA context's ~0.75 GiB)")
    swarm.add_argument("--identity", type=Path, metavar="FILE",
                       help="keep this worker's peer id across restarts: its private key file, created if missing")
    swarm.add_argument("--pretrained", type=Path, metavar="DIR",
                       help="a local copy of the Hugging Face checkpoint the run starts from (checked against "
                            "the coordinator's): this worker reads its stage from it instead of downloading it")
    swarm.add_argument("--public-addr", metavar="HOST:PORT",
                       help="behind a router: the public address and TCP port forwarded to this machine; the "
                            "data plane listens on that port and announces only this address")
    swarm.add_argument("--data-cache", type=Path, metavar="DIR",
                       help="where to keep the prepared data shards this worker fetches for its stage 0 "
                            "(default ~/.cache/swarmtrain/data)")
    swarm.add_argument("--data-cache-size", metavar="SIZE",
                       help="keep at most this much there, e.g. 20GB (the default); the shards in use always stay")
    swarm.add_argument("--link-mbps", type=float, metavar="MBPS",
                       help="this machine's upload/download rate in Mbit/s (default: assume 100)")

    testing = parser.add_argument_group("resilience testing (never on a real swarm)")
    testing.add_argument("--lie-scale", type=float, metavar="FACTOR",
                         help="act as a faulty or malicious volunteer: send this worker's pseudo-gradients in "
                              "averaging rounds multiplied by FACTOR, e.g. -1000; when it leads a round, it sends "
                              "the round's move multiplied by FACTOR and keeps the honest one")
    testing.add_argument("--withhold-rounds", type=float, nargs="?", const=math.inf, metavar="SECONDS",
                         help="act as a stalled volunteer: stay in the swarm and serve, but start none of the "
                              "averaging rounds this worker should lead, for SECONDS after it takes its stage "
                              "(for good without a value); the next replica stands in")

    parser.add_argument("--trace", type=Path, metavar="FILE",
                        help="append what this worker does (assignments, steps, losses, averaging rounds, and "
                             "in a swarm how it exited) to FILE as JSON lines")

    alone = parser.add_argument_group("standalone")
    alone.add_argument(
        "--standalone",
        action="store_true",
        help="train the whole model in this process, without a swarm (the single-machine reference)",
    )
    add_config_arguments(alone, default=STANDALONE_PRESET)
    parser.set_defaults(config=None)  # to tell "not given" from the standalone default
    alone.add_argument("--max-steps", type=int, metavar="N",
                       help="stop after N optimizer steps (0: keep the starting model as it is, e.g. to --export it)")
    alone.add_argument("--export", type=Path, metavar="DIR",
                       help="write the trained model to the new directory DIR in Hugging Face GPT-J format")
    return parser


def _public_addr(value: str | None) -> tuple[str, int] | None:
    """--public-addr HOST:PORT, checked; exits with one line when it is not that."""
    if value is None:
        return None
    if not is_endpoint(value):
        fail(f"--public-addr {value!r}: expected HOST:PORT, e.g. 203.0.113.7:31330 (the port forwarded to this machine)")
    host, _, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        fail(f"--public-addr {value!r}: HOST must be an IP address (the router's public one), not a name")
    return host.strip("[]"), int(port)


def choose_mode(args: argparse.Namespace) -> str:
    """'standalone' or 'swarm', or a one-line message naming what to pass (pure)."""
    chosen = (("--peers", bool(args.peers)), ("--coordinator", args.coordinator is not None),
              ("--standalone", args.standalone))
    given = [flag for flag, on in chosen if on]
    if not given:
        raise ValueError("pass --peers MULTIADDR (the address the coordinator printed after 'DHT:'), "
                         "--coordinator HOST:PORT, or --standalone to train on this machine alone")
    if len(given) > 1:
        raise ValueError(
            f"pass only one of --peers, --coordinator and --standalone (got {' and '.join(given)})")
    mode = "standalone" if args.standalone else "swarm"
    foreign = STANDALONE_FLAGS + ("config", "overrides") if mode == "swarm" else SWARM_FLAGS
    for name in foreign:
        if getattr(args, name) not in (None, []):
            flag = "--set" if name == "overrides" else "--" + name.replace("_", "-")
            why = ("in a swarm the run config comes from the coordinator" if name in ("config", "overrides")
                   else f"it applies to {'--standalone' if mode == 'swarm' else 'swarm mode'} only")
            raise ValueError(f"{flag}: {why}; drop it")
    return mode


def check_swarm_args(args: argparse.Namespace) -> list[str]:
    """Problems with the swarm flags, one line each (pure)."""
    problems = []
    for peer in args.peers:
        if not peer.startswith("/") or "/p2p/" not in peer:
            problems.append(f"--peers {peer}: not a peer multiaddr; copy the one the coordinator printed "
                            "after 'DHT:' (e.g. /ip4/1.2.3.4/tcp/50510/p2p/Qm…)")
    if args.coordinator is not None and not is_endpoint(args.coordinator):
        problems.append(f"--coordinator {args.coordinator}: expected HOST:PORT, e.g. 203.0.113.5:50500")
    if args.run_id is not None and not _RUN_ID.match(args.run_id):
        problems.append(f"--run-id {args.run_id!r}: letters, digits, '.', '_' or '-', at most 64")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        problems.append(f"--metrics-port {args.metrics_port}: a port is 0..65535 (0 picks a free one)")
    if args.public_name is not None and (len(args.public_name) > 64 or not args.public_name.isprintable()):
        problems.append("--public-name: at most 64 printable characters")
    if args.link_mbps is not None and not (math.isfinite(args.link_mbps) and 0 < args.link_mbps <= 1e6):
        problems.append(f"--link-mbps {args.link_mbps:g}: must be more than 0 and at most 1000000 (1 Tbit/s)")
    if args.withhold_rounds is not None and not args.withhold_rounds > 0:
        problems.append(f"--withhold-rounds {args.withhold_rounds:g}: must be a number of seconds > 0")
    if args.lie_scale is not None and not math.isfinite(args.lie_scale):
        problems.append(f"--lie-scale {args.lie_scale:g}: must be a finite number")
    if args.host is not None and not args.host.strip():
        problems.append("--host: must not be empty")
    problems += check_trace(args.trace)
    problems += check_identity(args.identity)
    return problems


def check_identity(path: Path | None) -> list[str]:
    """A problem with --identity FILE: a folder, a missing folder, or a file that holds no key."""
    if path is None:
        return []
    if path.is_dir():
        return [f"--identity {path}: is a folder; name a key file in it (created if missing)"]
    if not path.exists():
        return [] if path.parent.is_dir() and os.access(path.parent, os.W_OK) else [
            f"--identity {path}: folder {path.parent} does not exist or is not writable"]
    from hivemind.p2p import PeerID

    try:
        PeerID.from_identity(path.read_bytes())
    except Exception:  # noqa: BLE001 - unreadable, or not a libp2p private key
        return [f"--identity {path}: not a peer key file (move it away and a new one is created)"]
    return []


def check_trace(path: Path | None) -> list[str]:
    """A problem with --trace FILE, if its folder is missing or it is not a writable file (I/O)."""
    if path is None:
        return []
    if path.is_dir():
        return [f"--trace {path}: is a folder; name a file in it"]
    if not path.parent.is_dir():
        return [f"--trace {path}: folder {path.parent} does not exist"]
    if (path.exists() and not os.access(path, os.W_OK)) or not os.access(path.parent, os.W_OK):
        return [f"--trace {path}: not writable"]
    return []


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C before the worker's own handlers are in place (importing torch)
        print("\ninterrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["export"]:
        from worker.app.export_cli import export_main

        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        mode = choose_mode(args)
    except ValueError as err:
        fail(str(err))
    if mode == "swarm":
        return run_swarm(args)
    if args.max_steps is not None and args.max_steps < 0:
        fail(f"--max-steps {args.max_steps}: must be 0 (the starting model, e.g. to --export it) or more")
    problems = check_trace(args.trace)
    if args.export is not None and (args.export.exists() or not args.export.parent.is_dir()):
        problems.append(f"--export {args.export}: " + ("exists already; name a new directory" if args.export.exists()
                                                        else f"folder {args.export.parent} does not exist"))
    if problems:
        fail("\n".join(problems))
    args.config = args.config or STANDALONE_PRESET
    config = config_from_args(args)
    return run_standalone(config, args)


def run_swarm(args: argparse.Namespace) -> int:
    problems = check_swarm_args(args)
    if problems:
        fail("\n".join(problems))
    # forked before torch's and gRPC's threads and the P2P daemons exist: a crash, kill -9
    # included, takes the DHT process and the daemons with it
    guard_descendants()
    # torch, gRPC and hivemind load in seconds; import them only once the arguments are good.
    import asyncio

    from worker.app.hardware import SizeError, parse_size
    from worker.app.lifecycle import SwarmOptions, WorkerFailure, run_swarm_worker
    from worker.data.shard_cache import ShardSource

    try:
        max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
    except SizeError as err:
        fail(f"--max-memory {err}")
    try:
        cache = ShardSource(cache_dir=args.data_cache or ShardSource.cache_dir, cache_bytes=parse_size(
            args.data_cache_size) if args.data_cache_size is not None else ShardSource.cache_bytes)
    except SizeError as err:
        fail(f"--data-cache-size {err}")
    options = SwarmOptions(
        gpu=args.gpu, cpu=args.cpu, peers=args.peers, coordinator=args.coordinator, run_id=args.run_id,
        host=args.host or "0.0.0.0", join_token=args.join_token or "", metrics_port=args.metrics_port,
        public_name=args.public_name or "", max_memory_bytes=max_memory, link_mbps=args.link_mbps,
        trace=args.trace, lie_scale=args.lie_scale, withhold_rounds_s=args.withhold_rounds or 0.0, identity=args.identity,
        pretrained=args.pretrained, data_cache=cache, public_addr=_public_addr(args.public_addr),
    )
    try:
        return asyncio.run(run_swarm_worker(options, _print_flush))
    except WorkerFailure as err:
        fail(str(err), prefix=err.prefix, code=err.exit_code)


def run_standalone(config, args: argparse.Namespace) -> int:
    # torch and the data stack load in seconds; import them only once the arguments are good.
    from worker.app.device import DeviceError, describe_device, resolve_device
    from worker.data.source import open_token_data
    from worker.data.tokens import DataError
    from worker.runtime.standalone import format_report, train_locally
    from worker.telemetry.trace import Trace

    try:
        device = resolve_device(args.gpu, args.cpu)
    except DeviceError as err:
        fail(str(err))
    print(f"device: {describe_device(device)}", flush=True)
    pretrained = None
    if config.model.pretrained is not None:
        from configs.pretrained import PretrainedError, open_pretrained

        try:
            pretrained = open_pretrained(config.model.pretrained, config.model)
        except PretrainedError as err:
            fail(str(err), prefix="config error")
    started = time.perf_counter()
    try:
        data = open_token_data(config.data, config.training.seq_len, config.training.seed)
    except DataError as err:
        fail(str(err), prefix="data error")
    print(f"data: {data.describe()} (loaded in {time.perf_counter() - started:.1f}s)", flush=True)
    if data.tokenizer.vocab_size > config.model.vocab_size:
        fail(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{data.tokenizer.vocab_size} symbols: raise model.vocab_size",
            prefix="config error",
        )
    trace = Trace(args.trace)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # stop training, report, close the trace
    try:
        report = train_locally(config, data, device, max_steps=args.max_steps, log=_print_flush,
                               on_step=lambda step, loss: trace.write("step", stage=0, step=step, loss=loss),
                               pretrained=pretrained)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (FloatingPointError, ValueError) as err:
        fail(str(err), prefix="training error", code=1)
    finally:
        trace.close()
    print(format_report(report), flush=True)
    if args.export is not None and report.model is not None:
        from worker.model.export import ExportError, export_hf

        try:
            export_hf(report.model, config.model, args.export)
        except (ExportError, OSError) as err:
            fail(f"--export {args.export}: {err}", code=1)
        print(f"exported: {args.export} (Hugging Face GPT-J: config.json + model.safetensors)", flush=True)
    return 0


def _print_flush(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
