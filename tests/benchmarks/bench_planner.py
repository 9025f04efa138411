"""Time `plan()` on GPT-J 6B, priced at its stages' peak memory, for fleets of 100, 1,000 and 10,000 workers.

    python tests/benchmarks/bench_planner.py [--repeats 5] [--sizes 100 1000 10000]

Each fleet is drawn from the GPU catalog (configs/gpus.yaml): a random card at 30-60% of
its bf16 peak, 85-95% of its memory usable, links log-uniform between 10 Mbit/s and
10 Gbit/s with downloads 1-4x faster than uploads. Prints a table (median seconds over the
repeats, wall and CPU, the plan's rate and stage count, round robin's rate with the same stage count) and
writes tests/benchmarks/results/planner.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configs.loader import load_config
from configs.profile import model_profile
from coordinator.planning.planner import WorkerCapacity, plan, round_robin_plan
from tests.harness.fleets import catalog_fleet

RESULTS = ROOT / "tests" / "benchmarks" / "results" / "planner.json"


def random_fleet(size: int, seed: int) -> list[WorkerCapacity]:
    return catalog_fleet(np.random.default_rng(seed), size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = load_config("gptj-6b")
    profile = model_profile(config.model, config.training.precision, config.training)  # priced at its peak
    rows = []
    header = f"{'workers':>8} {'median s':>9} {'CPU s':>6} {'min s':>7} {'stages':>6} {'layers':>18} " \
             f"{'tokens/s':>12} {'round robin':>12} {'ratio':>6}"
    print(f"plan() on GPT-J 6B ({profile.n_layer} layers), {args.repeats} repeats per size")
    print(header)
    for size in args.sizes:
        workers = random_fleet(size, args.seed + size)
        times, cpu, result = [], [], None
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = plan(profile, workers)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)  # all of this process's threads
        assert result is not None
        naive = round_robin_plan(profile, workers, result.num_stages)
        layers = "/".join(str(b - a) for a, b in zip(result.boundaries, result.boundaries[1:]))
        ratio = result.rate / naive.rate if naive.rate > 0 else float("inf")
        row = {
            "workers": size,
            "median_s": statistics.median(times),
            "median_cpu_s": statistics.median(cpu),
            "min_s": min(times),
            "times_s": times,
            "stages": result.num_stages,
            "boundaries": list(result.boundaries),
            "rate_tokens_per_s": result.rate,
            "round_robin_tokens_per_s": naive.rate,
            "plan_over_round_robin": ratio,
            "idle_workers": size - len(result.stage_of),
            "note": result.note,
        }
        rows.append(row)
        print(f"{size:>8} {row['median_s']:>9.3f} {row['median_cpu_s']:>6.3f} {row['min_s']:>7.3f} {result.num_stages:>6} {layers:>18} "
              f"{result.rate:>12,.0f} {naive.rate:>12,.0f} {ratio:>6.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "planner",
        "model": "gptj-6b",
        "precision": config.training.precision,
        "repeats": args.repeats,
        "seed": args.seed,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
