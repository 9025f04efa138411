"""Speed, ratio and error of every codec, next to hivemind's own, on one large tensor.

    python tests/benchmarks/bench_codecs.py [--numel 16777216] [--repeats 5] [--devices cpu cuda] [--threads N]

Two tensors of `--numel` fp32 values, viewed as rows of `--cols`:
  gradient    randn * 1e-3 (a pseudo-gradient: small, dense, no structure; the worst case
              for PowerSGD, whose single-call error is then close to 1)
  activation  GELU of gaussian rows whose channels have log-normal scales, 1% of them
              20x larger (the outlier channels of transformer hidden states)
For each codec (worker.compression, on every device asked for: CUDA when available) and each
of hivemind's (CPU, through serialize_torch_tensor / deserialize_torch_tensor): the ratio
(wire bytes / fp32 bytes), the relative error ||x - x'|| / ||x|| of one call, median encode
and decode times over the repeats, and GB/s (fp32 input bytes / (encode + decode) time).
Top-k and PowerSGD are meant to run under error feedback, which sends their error later;
their one-call error is not what training sees. hivemind's BLOCKWISE_8BIT needs bitsandbytes
and is reported as unavailable without it. On CUDA, encoding includes copying the parts to
the host and decoding copying them back. Writes tests/benchmarks/results/codecs.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configs.compression import CODECS
from worker.compression import decode_any, get_codec

RESULTS = ROOT / "tests" / "benchmarks" / "results" / "codecs.json"
# hivemind's UNIFORM_8BIT calls torch.quantize_per_tensor, which recent torch deprecates
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
HIVEMIND = ("NONE", "FLOAT16", "MEANSTD_16BIT", "UNIFORM_8BIT", "QUANTILE_8BIT", "BLOCKWISE_8BIT")


def gradient_like(numel: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(numel // cols, cols, generator=generator) * 1e-3


def activation_like(numel: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    scales = torch.exp(0.5 * torch.randn(cols, generator=generator))
    outliers = torch.randperm(cols, generator=generator)[: max(1, cols // 100)]
    scales[outliers] *= 20
    return torch.nn.functional.gelu(torch.randn(numel // cols, cols, generator=generator) * scales)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[..., Any], device: str, *args: Any) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = run(*args)
    sync(device)
    return time.perf_counter() - start, result


def relative_error(tensor: torch.Tensor, decoded: torch.Tensor) -> float:
    reference = tensor.double()
    return float((decoded.to(tensor.device).double() - reference).norm() / reference.norm())


def measure(
    encode: Callable[[], Any], decode: Callable[[Any], torch.Tensor], nbytes: Callable[[Any], int],
    tensor: torch.Tensor, repeats: int, device: str,
) -> dict[str, Any]:
    encode_s, decode_s = [], []
    encoded, decoded = None, None
    for _ in range(repeats + 1):  # the first run warms up and is not counted
        seconds, encoded = timed(encode, device)
        encode_s.append(seconds)
        seconds, decoded = timed(decode, device, encoded)
        decode_s.append(seconds)
    encode_s, decode_s = encode_s[1:], decode_s[1:]
    total = [a + b for a, b in zip(encode_s, decode_s)]
    assert decoded is not None
    return {
        "ratio": nbytes(encoded) / (tensor.numel() * 4),
        "rel_error": relative_error(tensor, decoded),
        "encode_ms": statistics.median(encode_s) * 1e3,
        "decode_ms": statistics.median(decode_s) * 1e3,
        "gb_per_s": tensor.numel() * 4 / statistics.median(total) / 1e9,
        "encode_s": encode_s,
        "decode_s": decode_s,
    }


def ours(name: str, tensor: torch.Tensor, args: argparse.Namespace, device: str) -> dict[str, Any]:
    codec = get_codec(name, block_size=args.block_size, topk_fraction=args.topk_fraction, rank=args.rank)
    on_device = tensor.to(device)
    row = measure(
        lambda: codec.encode(on_device), lambda e: decode_any(e, device=device), lambda e: e.nbytes,
        on_device, args.repeats, device,
    )
    return {"library": "swarmtrain", "codec": name, "device": device, **row}


def hivemind_codec(kind: str, tensor: torch.Tensor, repeats: int) -> dict[str, Any]:
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto.runtime_pb2 import CompressionType

    compression = getattr(CompressionType, kind)
    row: dict[str, Any] = {"library": "hivemind", "codec": kind, "device": "cpu"}
    try:
        row |= measure(
            lambda: serialize_torch_tensor(tensor, compression), deserialize_torch_tensor,
            lambda message: len(message.buffer), tensor, repeats, "cpu",
        )
    except (ImportError, RuntimeError, ValueError, TypeError) as err:  # say why, go on
        row["unavailable"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return row


def show(data: str, row: dict[str, Any]) -> None:
    label = f"{row['library']}:{row['codec']}"
    if "unavailable" in row:
        print(f"{data:<10} {row['device']:<6} {label:<26} unavailable ({row['unavailable'][:60]})")
        return
    print(
        f"{data:<10} {row['device']:<6} {label:<26} {row['ratio']:>7.4f} {row['rel_error']:>9.2e} "
        f"{row['encode_ms']:>9.1f} {row['decode_ms']:>9.1f} {row['gb_per_s']:>7.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16 * 2**20, help="values per tensor (rounded down to rows)")
    parser.add_argument("--cols", type=int, default=4096, help="row length (the matrix PowerSGD sees)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per codec (>= 5 for the report)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--topk-fraction", type=float, default=0.01)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--no-hivemind", action="store_true", help="leave hivemind's codecs out")
    args = parser.parse_args()
    if args.numel < args.cols:
        parser.error("--numel must be at least --cols")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    data = {
        "gradient": gradient_like(args.numel, args.cols, args.seed),
        "activation": activation_like(args.numel, args.cols, args.seed),
    }
    shape = tuple(data["gradient"].shape)
    print(
        f"codecs on {shape[0] * shape[1]:,} fp32 values {shape}, median of {args.repeats} runs; "
        f"block_size {args.block_size}, topk_fraction {args.topk_fraction}, rank {args.rank}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else "")
    )
    print(
        f"{'data':<10} {'device':<6} {'codec':<26} {'ratio':>7} {'rel err':>9} "
        f"{'enc ms':>9} {'dec ms':>9} {'GB/s':>7}"
    )
    rows = []
    for name, tensor in data.items():
        for device in devices:
            for codec in CODECS:
                row = {"data": name, **ours(codec, tensor, args, device)}
                rows.append(row)
                show(name, row)
        if not args.no_hivemind:
            for kind in HIVEMIND:
                row = {"data": name, **hivemind_codec(kind, tensor, args.repeats)}
                rows.append(row)
                show(name, row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "codecs",
        "shape": list(shape),
        "repeats": args.repeats,
        "block_size": args.block_size,
        "topk_fraction": args.topk_fraction,
        "rank": args.rank,
        "seed": args.seed,
        "devices": devices,
        "cuda_device": torch.cuda.get_device_name() if "cuda" in devices else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
