"""`worker export`: write a running swarm's model as a Hugging Face GPT-J directory.

    worker export --coordinator HOST:PORT --config tiny --out DIR

The coordinator's GetSwarm says where each stage's replicas are; the stages' current global
parameters (their averaging anchors) are downloaded over P2P from one replica each and
written with worker.model.export. `--config` must be the run's config (its hash is checked against
the coordinator's), since the model's shape comes from it.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from configs.cli_args import add_config_arguments, config_from_args, fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker export",
                                     description="Write a running swarm's model in Hugging Face GPT-J format.")
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the swarm's coordinator")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="a new directory to write")
    add_config_arguments(parser)
    return parser


def export_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.config is None:
        fail("--config: name the run's config (e.g. tiny or a YAML file): the model's shape comes from it")
    if args.out.exists() or not args.out.parent.is_dir():
        fail(f"--out {args.out}: " + ("exists already; name a new directory" if args.out.exists()
                                      else f"folder {args.out.parent} does not exist"))
    config = config_from_args(args)

    import grpc
    from hivemind.p2p import P2P

    from protos import swarmtrain_pb2 as pb
    from protos import swarmtrain_pb2_grpc as pb_grpc
    from worker.app.swarm_model import GatherError, gather_model
    from worker.model.export import ExportError, export_hf

    try:
        with grpc.insecure_channel(args.coordinator) as channel:
            swarm = pb_grpc.CoordinatorStub(channel).GetSwarm(pb.GetSwarmRequest(), timeout=20)
    except grpc.RpcError as err:
        fail(f"cannot reach the coordinator at {args.coordinator}: {err.code().name}", code=1)
    if swarm.config_hash != config.fingerprint():
        fail(f"--config {args.config} hashes to {config.fingerprint()}, the run at {args.coordinator} to "
             f"{swarm.config_hash}: pass the run's config")

    async def gather():  # noqa: ANN202 - a GPTJ
        p2p = await P2P.create(host_maddrs=["/ip4/0.0.0.0/tcp/0"])
        try:
            return await gather_model(p2p, swarm, config, swarm.run_id)
        finally:
            await p2p.shutdown()

    try:
        model = asyncio.run(gather())
        export_hf(model, config.model, args.out)
    except (GatherError, ExportError, OSError) as err:
        fail(f"export failed: {err}", code=1)
    print(f"exported: {args.out} (run {swarm.run_id}, plan {swarm.plan_version}; Hugging Face GPT-J: "
          "config.json + model.safetensors)", flush=True)
    return 0
