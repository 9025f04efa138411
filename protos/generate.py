"""Regenerate protos/swarmtrain_pb2*.py and .pyi from protos/swarmtrain.proto.

    python -m protos.generate            # rewrite the committed files
    python -m protos.generate --check    # exit 1 if they are out of date

Imports come out as `from protos import swarmtrain_pb2` because protoc runs from the
repository root with the proto at protos/swarmtrain.proto; nothing is rewritten afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/swarmtrain.proto"
OUTPUTS = ("swarmtrain_pb2.py", "swarmtrain_pb2.pyi", "swarmtrain_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # test-only dependency (grpcio-tools)

    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


def stale_outputs() -> list[str]:
    """Names of generated files that differ from what the .proto generates now."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "protos"
        return [n for n in OUTPUTS if (fresh / n).read_bytes() != _read(ROOT / "protos" / n)]


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args()
    if args.check:
        stale = stale_outputs()
        for name in stale:
            print(f"protos/{name} is out of date: run python -m protos.generate", file=sys.stderr)
        return 1 if stale else 0
    generate(ROOT)
    print("regenerated " + ", ".join(f"protos/{n}" for n in OUTPUTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
