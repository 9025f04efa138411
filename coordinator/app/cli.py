"""`coordinator`: the operator's command.

`coordinator --config C` serves a run and `coordinator --config C --check` validates its config;
`coordinator plan --config C [--fleet F] [--datacenter GPU:N]` estimates offline what the run
costs in FLOPs, memory, time, money and energy, and starts nothing;
`coordinator token add|list|revoke --state-dir DIR` manages the join tokens volunteers use;
`coordinator status [--coordinator HOST:PORT] [--json]` shows a running swarm;
`coordinator data prepare --config C --out DIR` tokenizes the corpus once into shards workers memory-map.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from configs.cli_args import add_config_arguments, add_version_argument, config_from_args, fail
from configs.process_guard import guard_descendants
from configs.profile import model_profile, total_params
from configs.schema import RunConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator",
        description="Admit volunteer workers, plan pipeline stages and watch a swarmtrain run.",
        epilog="To estimate a run's time, money and energy offline instead: coordinator plan --help. "
        "To issue and revoke join tokens: coordinator token --help. To see a running swarm: coordinator status --help. "
        "To prepare a large corpus once: coordinator data --help",
    )
    add_version_argument(parser)
    add_config_arguments(parser)
    parser.add_argument("--check", action="store_true", help="validate the config, print its summary and exit")
    net = parser.add_argument_group("serving (each overrides the config's coordinator section)")
    net.add_argument("--host", help="address to listen on (default from config: 0.0.0.0)")
    net.add_argument("--grpc-port", type=int, metavar="PORT", help="gRPC port; 0 picks a free one")
    net.add_argument("--dht-port", type=int, metavar="PORT", help="hivemind DHT port; 0 picks a free one")
    net.add_argument("--metrics-port", type=int, metavar="PORT", help="Prometheus /metrics port; 0 picks a free one")
    net.add_argument("--state-dir", metavar="DIR", help="where the SQLite registry lives")
    net.add_argument("--join-token", metavar="TOKEN", help="admit only workers started with this token")
    net.add_argument("--announce-host", metavar="HOST", help="address to tell volunteers (default: --host, "
                     "or this machine's name when listening on all interfaces)")
    net.add_argument("--initial-peers", nargs="*", default=[], metavar="MULTIADDR",
                     help="other DHT peers to join (e.g. a second coordinator's)")
    net.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve gRPC over TLS with this certificate")
    net.add_argument("--tls-key", type=Path, metavar="PEM", help="private key for --tls-cert")
    return parser


def build_plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator plan",
        description="Estimate offline what training a config costs: FLOPs, memory per layer and stage, the "
        "layers each catalog GPU holds, and for a fleet of catalog GPUs its tokens/s, wall time, $ and kWh "
        "next to a datacenter run. Starts nothing and needs no network.",
    )
    add_config_arguments(parser)
    parser.add_argument("--tokens", metavar="N",
                        help="token budget, e.g. 3.53e9 (default: the config's training.total_tokens)")
    parser.add_argument("--fleet", type=Path, metavar="FLEET.yaml",
                        help="a list of {gpu: CATALOG_ID, count: N, link_mbps: M[, usd_per_hour: P]} entries, "
                        "e.g. configs/fleets/consumer-64.yaml")
    parser.add_argument("--datacenter", metavar="GPU[:COUNT]",
                        help="rented catalog GPUs to compare with, e.g. A100-80GB:8 "
                        "(default: metrics.datacenter_reference_gpu, 8 of them)")
    parser.add_argument("--mfu", metavar="FRACTION",
                        help="share of peak FLOP/s training achieves, on every GPU (default 0.4)")
    return parser


def plan_main(argv: list[str]) -> int:
    """`coordinator plan`: print the cost report, or one line per problem and exit 2."""
    # imported here: serving and --check need none of the estimate's modules
    from configs.catalog import load_catalog
    from configs.fleet import load_fleet
    from configs.loader import ConfigError
    from coordinator.costs.model import DEFAULT_MFU
    from coordinator.costs.report import parse_datacenter, parse_mfu, parse_tokens, plan_report
    from coordinator.planning.planner import InfeasiblePlanError

    args = build_plan_parser().parse_args(argv)
    try:
        if args.tokens is not None:  # through --set, so the budget is validated like any config value
            args.overrides = [*args.overrides, f"training.total_tokens={parse_tokens(args.tokens)}"]
        mfu = parse_mfu(args.mfu) if args.mfu is not None else DEFAULT_MFU
    except ValueError as err:
        fail(str(err))
    config = config_from_args(args)
    try:
        catalog = load_catalog()
    except ConfigError as err:
        fail(str(err), prefix="catalog error")
    try:
        if args.datacenter is not None:
            datacenter = parse_datacenter(args.datacenter, catalog, "--datacenter")
        else:
            datacenter = parse_datacenter(config.metrics.datacenter_reference_gpu, catalog,
                                          "metrics.datacenter_reference_gpu")
    except ValueError as err:
        fail(str(err))
    try:
        fleet = load_fleet(args.fleet, catalog) if args.fleet is not None else None
    except ConfigError as err:
        fail(str(err), prefix="fleet error")
    try:
        fleet_name = args.fleet.name if args.fleet is not None else ""
        report = plan_report(config, catalog, datacenter=datacenter, fleet=fleet, fleet_name=fleet_name, mfu=mfu)
    except InfeasiblePlanError as err:
        fail(str(err), prefix="plan error")
    print(describe_run(config))
    print()
    print(report)
    return 0


_FLAG_KEYS = {"host": "host", "grpc_port": "grpc_port", "dht_port": "dht_port", "metrics_port": "metrics_port",
              "state_dir": "state_dir", "join_token": "join_token"}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Serving flags become `--set coordinator.X=...` so they pass the same validation."""
    return [
        f"coordinator.{key}={json.dumps(getattr(args, attr))}"  # JSON is YAML: strings stay strings
        for attr, key in _FLAG_KEYS.items()
        if getattr(args, attr) is not None
    ]


def describe_run(config: RunConfig) -> str:
    """A few lines an operator reads to confirm the config is the run they meant."""
    m, t = config.model, config.training
    profile = model_profile(m, t.precision)
    block = profile.blocks[0]
    params = total_params(m)
    return "\n".join(
        [
            f"run {config.coordinator.run_id} · config {config.fingerprint()}",
            (f"model: GPT-J, {_count(params)} parameters ({params:,}) · {m.n_layer} layers · "
             f"d_model {m.d_model} · {m.n_head} heads · rotary {m.rotary_dim} · vocab {m.vocab_size} · "
             f"context {m.n_ctx}"),
            (f"per layer: {_count(block.params)} parameters · {block.train_memory_bytes / 1e9:.3g} GB to train "
             f"at {t.precision} · {block.activation_bytes_per_token:,} B/token across a stage boundary"),
            (f"training: {t.total_tokens:,} tokens · batch {t.batch_size}×{t.seq_len} · "
             f"{6 * params * t.total_tokens:.2e} FLOPs"),
            f"weights: {m.pretrained} (pretrained)" if m.pretrained else f"weights: random (seed {t.seed})",
        ]
    )


def _count(n: float) -> str:
    """6050882784 -> '6.05B', 856064 -> '856K': how people say model sizes."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(int(n))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the subcommands; every other command line serves or checks a run
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    if argv[:1] == ["status"]:
        from coordinator.app.status_cli import status_main

        return status_main(argv[1:])
    if argv[:1] == ["data"]:
        from coordinator.app.data_cli import data_main

        return data_main(argv[1:])
    if argv[:1] == ["token"]:
        from coordinator.app.token_cli import token_main

        return token_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.overrides = [*args.overrides, *flag_overrides(args)]
    config = config_from_args(args)
    if config.model.pretrained is not None:  # checked here, before the server stack loads
        from configs.pretrained import PretrainedError, open_pretrained

        try:
            open_pretrained(config.model.pretrained, config.model)
        except PretrainedError as err:
            fail(str(err), prefix="config error")
    if config.data.prepared is not None:  # the coordinator hands its sequences out: it reads the manifest
        from configs.data.errors import DataError
        from configs.data.shards import read_manifest

        try:
            read_manifest(config.data.prepared)
        except DataError as err:
            fail(str(err), prefix="config error")
    if args.check:
        print(describe_run(config))
        print("config ok")
        return 0
    tls = _read_tls(args)
    # forked before the server stack's threads and the DHT's processes exist: a crash, kill -9
    # included, takes the DHT process and its P2P daemon with it
    guard_descendants()
    # the server stack (grpc, hivemind) loads in seconds: only once the config is good
    from configs.data.errors import DataError
    from coordinator.api.dht import IdentityError
    from coordinator.api.server import CoordinatorServer, run_until_signalled
    from coordinator.storage.registry import RegistryError
    from coordinator.storage.state_lock import StateDirBusy

    print(describe_run(config), flush=True)
    try:
        server = CoordinatorServer(config, tls=tls, dht_initial_peers=args.initial_peers,
                                   announce_host=args.announce_host)
        asyncio.run(run_until_signalled(server, lambda endpoints: print(ready_banner(config, endpoints), flush=True)))
    except (RegistryError, IdentityError, StateDirBusy) as err:
        fail(str(err), prefix="state error")
    except DataError as err:  # prepared data too small for one step (the manifest itself was checked above)
        fail(str(err), prefix="config error")
    except OSError as err:
        fail(str(err))
    print("coordinator stopped; registry saved", flush=True)
    return 0


def _read_tls(args: argparse.Namespace):  # -> TlsFiles | None, imported late
    if (args.tls_cert is None) != (args.tls_key is None):
        fail("--tls-cert and --tls-key go together: pass both, or neither for plaintext gRPC")
    if args.tls_cert is None:
        return None
    from coordinator.api.server import TlsFiles

    try:
        return TlsFiles(cert=args.tls_cert.read_bytes(), key=args.tls_key.read_bytes())
    except OSError as err:
        fail(f"cannot read TLS file {err.filename}: {err.strerror}")


def ready_banner(config: RunConfig, endpoints) -> str:  # endpoints: server.Endpoints, imported late
    """What the operator needs on start: where things are, and the one command for volunteers."""
    c = config.coordinator
    peers = endpoints.dht_multiaddrs[0] if endpoints.dht_multiaddrs else "<multiaddr>"
    token = f" --join-token {c.join_token}" if c.join_token else ""
    return "\n".join([
        f"coordinator ready · gRPC {endpoints.grpc} · state {c.state_dir}",
        f"metrics: {endpoints.metrics_url}",
        f"swarm page: {endpoints.metrics_url.removesuffix('/metrics')}/status",
        "DHT: " + " ".join(endpoints.dht_multiaddrs),
        "",
        "Volunteers join this swarm with:",
        f"  worker {join_device(config)} --peers {peers}{token}",
        "",
    ])


def join_device(config: RunConfig) -> str:
    """The device flag the join command suggests: fp32 is the CPU presets' precision (a GPU
    run trains in bf16 or fp16), so those are joined with --cpu."""
    return "--cpu" if config.training.precision == "fp32" else "--gpu 0"


if __name__ == "__main__":
    sys.exit(main())
