"""`coordinator data prepare|verify`: the operator's prepared token shards.

`prepare --config C --out DIR` tokenizes the config's `data` section once into shards that every
worker memory-maps (run with `--set data.prepared=DIR`); it shows its progress, and run again
after an interruption it resumes. `verify DIR` re-reads every shard against its sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from configs.cli_args import add_config_arguments, config_from_args, fail
from configs.data.errors import DataError
from configs.data.shards import SPLITS, read_manifest
from coordinator.data.prepare import DEFAULT_SHARD_TOKENS, PrepareProgress, prepare

_STATUS_EVERY_S = 5.0  # between progress lines when stderr is not a terminal


def build_data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator data",
        description="Prepare a run's corpus once as token shards that workers memory-map, and check them.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="{prepare,verify}")
    prep = actions.add_parser("prepare", help="tokenize the config's data section into shards in DIR",
                              description="Read the config's data.paths as a stream, tokenize them with "
                              "data.tokenizer, and write token shards and a manifest to DIR. Run it again "
                              "after an interruption to resume. Then train with --set data.prepared=DIR.")
    add_config_arguments(prep)
    prep.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new or empty directory "
                      "(or one this same prepare was interrupted in)")
    prep.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_TOKENS * 2 >> 20, metavar="MB",
                      help="megabytes of uint16 tokens per shard (default %(default)s)")
    verify = actions.add_parser("verify", help="check every shard in DIR against its sha256",
                                description="Re-read every shard of prepared data and check its size and sha256.")
    verify.add_argument("dir", type=Path, metavar="DIR")
    return parser


def data_main(argv: list[str]) -> int:
    args = build_data_parser().parse_args(argv)
    try:
        return _prepare(args) if args.action == "prepare" else _verify(args.dir)
    except DataError as err:
        fail(str(err), prefix="data error")
    except OSError as err:  # a full disk, a directory without write permission
        fail(f"{err.filename or ''}: {err.strerror or err}", prefix="data error", code=1)


def _prepare(args: argparse.Namespace) -> int:
    if args.shard_size < 1:
        fail(f"--shard-size {args.shard_size}: must be at least 1 (MB)")
    config = config_from_args(args)
    line = _StatusLine()
    manifest = prepare(config.data, args.out, shard_tokens=args.shard_size << 19, progress=line.update)
    line.close()
    shards = len(manifest.train) + len(manifest.validation)
    print(f"prepared: {args.out} · {manifest.documents:,} documents, {manifest.text_bytes / 1e6:,.1f} MB of text · "
          f"{manifest.tokens('train'):,} train / {manifest.tokens('validation'):,} validation tokens in {shards} "
          f"shard(s) · {manifest.tokenizer} tokenizer · fp {manifest.fingerprint[:8]}")
    print(f"train on it with: --set data.prepared={args.out}")
    return 0


def _verify(directory: Path) -> int:
    manifest = read_manifest(directory)
    bad = []
    itemsize = 2 if manifest.dtype == "uint16" else 4
    for split in SPLITS:
        for shard in manifest.shards(split):
            path = directory / shard.name
            if not path.exists() or path.stat().st_size != shard.tokens * itemsize:
                bad.append(f"{shard.name}: missing or of the wrong size")
                continue
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(8 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != shard.sha256:
                bad.append(f"{shard.name}: sha256 differs from the manifest")
    if bad:
        fail("\n".join([*bad, f"{len(bad)} shard(s) damaged: prepare {directory} again"]), prefix="data error",
             code=1)
    print(f"verified: {directory} · {len(manifest.train) + len(manifest.validation)} shard(s) match their sha256")
    return 0


class _StatusLine:
    """Progress on stderr: rewritten in place on a terminal, a line every few seconds elsewhere."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = 0.0
        self.last = ""

    def update(self, p: PrepareProgress) -> None:
        now = time.monotonic()
        if now - self.shown < (0.5 if self.tty else _STATUS_EVERY_S):
            return
        self.shown = now
        rate = p.bytes_read / p.elapsed_s if p.elapsed_s > 0 else 0.0
        left = (p.bytes_total - p.bytes_read) / rate if rate > 0 else float("inf")
        eta = "estimating" if left == float("inf") else f"{left:.0f} s left" if left < 120 else f"{left / 60:.0f} min left"
        skipped = f" · {p.skipped:,} already prepared" if p.skipped else ""
        self.last = (f"prepare: {p.bytes_read / 1e6:,.0f} / {p.bytes_total / 1e6:,.0f} MB read "
                     f"({rate / 1e6:.1f} MB/s) · {p.documents:,} documents · {p.tokens:,} tokens{skipped} · {eta}")
        print(("\r" + self.last) if self.tty else self.last, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.last:
            print(file=sys.stderr)
