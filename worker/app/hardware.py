"""What this machine brings to the swarm: device, memory, measured compute, link rates.

The coordinator plans with these figures, so compute is measured (a short matmul benchmark)
rather than looked up; the catalog only supplies the datasheet peak that bounds it.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from configs.catalog import load_catalog
from configs.link import Link
from configs.memory import usable_memory
from protos import swarmtrain_pb2 as pb

# Until the link is measured, assume a modest home connection: a planner that expects too
# little bandwidth merely compresses more, one that expects too much stalls the pipeline.
DEFAULT_LINK_MBPS = 100.0
BENCHMARK_RUNS = 3
BENCHMARK_RUN_S = 0.12  # three timed runs: ~0.4 s in all, after warm-up
BENCHMARK_MAX_RUNS = 12  # on a busy machine it runs on until the last three agree, ~1.5 s at most
STABLE_SPREAD = 1.25  # "agree": the fastest of them within this factor of the slowest
CPU_MATMUL_SIZE = 512
GPU_MATMUL_SIZE = 4096  # large enough to keep a datacenter GPU's tensor cores busy

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class SizeError(ValueError):
    """A memory size that cannot be read; the message shows what is accepted."""


@dataclass(frozen=True)
class HardwareReport:
    gpu_name: str  # empty on a CPU
    gpu_count: int  # 0 on a CPU
    memory_bytes: int  # what the stage may use, after --max-memory
    achieved_flops: float  # measured, FLOP/s
    peak_flops: float  # datasheet peak at the benchmark's precision, FLOP/s
    link: Link  # bytes/s each way
    description: str  # one line for the volunteer

    @property
    def upload_bps(self) -> float:  # bits/s, as the profile carries it
        return self.link.upload_bps

    @property
    def download_bps(self) -> float:
        return self.link.download_bps


def parse_size(text: str) -> int:
    """'20GB' -> 20e9, '512MiB' -> 512 * 2**20, '4096B' -> 4096 bytes (pure). A unit is required:
    a bare '9' is far more likely a forgotten 'GB' than nine bytes, and nine bytes never fit a stage."""
    match = _SIZE.match(text)
    if not match:
        raise SizeError(f"{text!r} is not a size: write e.g. 20GB, 512MiB or 24GiB")
    if match.group(2) is None:
        raise SizeError(f"{text!r} has no unit: write e.g. {match.group(1)}GB or {match.group(1)}GiB "
                        f"(or {match.group(1)}B for bytes)")
    number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise SizeError(f"{text!r}: a memory size must be more than 0 bytes")
    return size


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_flops(flops: float) -> str:
    return f"{flops / 1e12:.3g} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.3g} GFLOP/s"


def probe_hardware(
    device: torch.device, *, max_memory_bytes: int | None, link_mbps: float | None
) -> HardwareReport:
    """Measure `device` (a few tenths of a second of matmuls) and describe it."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, count, total = props.name, 1, int(props.total_memory)
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        achieved = measure_matmul_flops(device, dtype, GPU_MATMUL_SIZE)
        spec = load_catalog().match_device_name(name)
        # A card the catalog lacks (or one faster than its entry) reports what it achieved:
        # the coordinator refuses a profile whose achieved figure exceeds its peak.
        peak = max(spec.peak(precision), achieved) if spec else achieved
        entry = spec.id if spec else "not in the GPU catalog"
        where = f"{name} (cuda:{device.index}, {_driver_note()}{entry})"
    else:
        name, count, total, precision = "", 0, available_ram_bytes(), "fp32"
        achieved = measure_matmul_flops(device, torch.float32, CPU_MATMUL_SIZE)
        peak = achieved  # no catalog entry for CPUs: the measurement is the best figure we have
        where = f"CPU ({torch.get_num_threads()} threads)"
    # what a stage may use: the framework (and CUDA context) take their share of the whole first;
    # --max-memory caps what is left, and is itself what the stage may use
    usable = usable_memory(total, "cuda" if device.type == "cuda" else "cpu")
    memory = min(usable, max_memory_bytes) if max_memory_bytes else usable
    # one figure for both directions: --link-mbps gives one, and nothing measures either
    link = Link.from_mbps(link_mbps if link_mbps else DEFAULT_LINK_MBPS)
    memory_note = f"{format_bytes(memory)} for a stage" + (
        f" (capped by --max-memory; {format_bytes(total)} present)" if memory < usable
        else f" ({format_bytes(total)} less the framework's reserve)"
    )
    link_note = link.describe()
    if not link_mbps:
        link_note += " assumed (pass --link-mbps to set it)"
    description = (
        f"{where} · {memory_note} · {format_flops(achieved)} {precision} measured"
        + (f" (peak {format_flops(peak)})" if device.type == "cuda" else "")
        + f" · {link_note}"
    )
    return HardwareReport(name, count, memory, achieved, peak, link, description)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int,
                         runs: int = BENCHMARK_RUNS, run_s: float = BENCHMARK_RUN_S,
                         max_runs: int = BENCHMARK_MAX_RUNS) -> float:
    """Median FLOP/s of the last `runs` timed bursts of size x size matmuls, each about `run_s`
    long, once they agree (or after `max_runs`): one busy moment does not set the figure the
    planner starts from. (It replaces it with measured training rates as soon as there are any.)"""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty_like(a)
    on_gpu = device.type == "cuda"
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)

    def burst(iters: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        sync()  # CUDA launches are asynchronous: time the work, not the queueing
        return time.perf_counter() - start

    burst(1)  # warm-up: library initialisation and kernel selection
    # the fastest of three short bursts sizes the timed ones: one preempted burst would make
    # every timed burst a single matmul, too short to time on a busy machine
    per_matmul = max(min(burst(2) for _ in range(3)) / 2, 1e-9)
    iters = max(1, math.ceil(run_s / per_matmul))
    flops_per_matmul = 2 * size**3
    samples: list[float] = []
    while len(samples) < runs or (len(samples) < max_runs and not stable(samples[-runs:])):
        samples.append(flops_per_matmul * iters / burst(iters))
    return statistics.median(samples[-runs:])


def stable(samples: list[float], spread: float = STABLE_SPREAD) -> bool:
    """Whether timed runs agree: the fastest within `spread` of the slowest (pure)."""
    return bool(samples) and max(samples) <= spread * min(samples)


def available_ram_bytes() -> int:
    """Memory the OS could give us now (MemAvailable), else the machine's total."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _driver_note() -> str:
    """'driver 550.54.15, ' when NVML is installed (nvidia-ml-py is optional), else ''."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return ""
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return ""
    return f"driver {version.decode() if isinstance(version, bytes) else version}, "


def to_profile(
    report: HardwareReport,
    software_version: str,
    public_name: str,
    peer_id: str,
    multiaddrs: list[str],
    metrics_endpoint: str,
) -> pb.WorkerProfile:
    return pb.WorkerProfile(
        software_version=software_version,
        gpu_name=report.gpu_name,
        gpu_count=report.gpu_count,
        memory_bytes=report.memory_bytes,
        achieved_flops=report.achieved_flops,
        peak_flops=report.peak_flops,
        upload_bps=report.link.upload_bps,
        download_bps=report.link.download_bps,
        public_name=public_name,
        peer_id=peer_id,
        multiaddrs=multiaddrs,
        metrics_endpoint=metrics_endpoint,
    )
