"""`coordinator status`: the running swarm in a terminal, over the coordinator's gRPC API.

    coordinator status [--coordinator HOST:PORT] [--json] [--tls]

The same view as the swarm page (`/status` on the metrics port) and the same JSON as its
`/status.json` (coordinator/api/status.py builds all three from one GetSwarm answer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from configs.cli_args import fail, is_endpoint

TIMEOUT_S = 10.0


def build_status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator status",
                                     description="Show a running swarm: its progress, what bounds it, and every "
                                                 "stage with its workers.")
    parser.add_argument("--coordinator", default="127.0.0.1:50500", metavar="HOST:PORT",
                        help="the coordinator's gRPC address (default 127.0.0.1:50500)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON, as /status.json serves it")
    parser.add_argument("--tls", action="store_true", help="the coordinator serves gRPC over TLS")
    return parser


def status_main(argv: list[str]) -> int:
    args = build_status_parser().parse_args(argv)
    if not is_endpoint(args.coordinator):
        fail(f"--coordinator {args.coordinator}: expected HOST:PORT, e.g. 127.0.0.1:50500")
    import grpc  # loads in a second: only once the arguments are good

    from coordinator.api.status import format_status, swarm_status
    from protos import swarmtrain_pb2 as pb
    from protos import swarmtrain_pb2_grpc as pb_grpc

    channel = (grpc.secure_channel(args.coordinator, grpc.ssl_channel_credentials()) if args.tls
               else grpc.insecure_channel(args.coordinator))
    try:
        view = pb_grpc.CoordinatorStub(channel).GetSwarm(pb.GetSwarmRequest(), timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        fail(f"cannot get the swarm from {args.coordinator}: {err.code().name.lower()} "  # type: ignore[attr-defined]
             f"({(err.details() or '').splitlines()[0] if err.details() else 'no details'}); "  # type: ignore[attr-defined]
             "is the coordinator running there (its gRPC port, not the metrics port)?", code=1)
    finally:
        channel.close()
    status = swarm_status(view, time.time())
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


if __name__ == "__main__":
    sys.exit(status_main(sys.argv[1:]))
