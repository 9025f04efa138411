"""Slow-links benchmark: data parallelism vs swarmtrain when every process sits behind a thin link.

    sudo .venv/bin/python tests/benchmarks/bench_slow_links.py [--rate-mbit 20] [--seconds 75] \
        [--seconds-a S] [--configs a,b,c,d] [--target-loss 3.0] [--repeat 1] [--preset tiny] \
        [--set coordinator.KEY=VALUE]

Every process runs in its own network namespace, joined to the others by a Linux bridge in the
root namespace (tests/benchmarks/netbed.py); each namespace's veth is shaped in both
directions with `tc ... tbf` at --rate-mbit. Configurations:

  a  plain data parallel: hivemind.Optimizer averaging fp32 gradients every step (2 peers)
  b  hivemind.Optimizer as users run it: 512-sequence target batch, fp16 gradients (2 peers)
  c  swarmtrain: a coordinator and 4 CPU workers, each capped at ~2/3 of the model's training
     memory so that the planner splits it in two (2 stages x 2 replicas),
     each worker told its link (--link-mbps) so the coordinator picks its compression policy
  d  c on unshaped links

Per configuration, over a window of --seconds (--seconds-a for (a)) from the first trained token: tokens/s, bytes
sent per trained token (the namespaces' veth tx counters, summed; the evaluator's own downloads
are subtracted), the validation loss at the token count every configuration reached, and the
time to --target-loss, and how busy the machine's CPUs were. The swarm's validation loss
comes from an evaluator in its own namespace that gathers the live stages' parameters every
--eval-every seconds. --preset picks the model (tiny, ~0.9M parameters; small, ~3.3M at
twice the width). Results go to tests/benchmarks/results/slow_links.json. Needs root
(namespaces, tc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from netbed import DEFAULT_BURST, NetBed, NetBedError, check_prerequisites

from configs.loader import ConfigError, load_config
from configs.memory import stage_peak
from configs.profile import model_profile

RESULTS = ROOT / "tests" / "benchmarks" / "results"
PEER_SCRIPT = Path(__file__).resolve().parent / "slow_links_peer.py"
LAUNCH = str(Path(__file__).resolve().parent / "slow_links_launch.py")
READY = re.compile(r"coordinator ready · gRPC (\S+) ")
NAMES = {
    "a": "plain data parallel (fp32 grads every step)",
    "b": "hivemind.Optimizer (512-seq batch, fp16 grads)",
    "c": "swarmtrain (its policy)",
    "d": "swarmtrain, unshaped links",
}
STARTUP_LIMIT_S = 240.0
TC_SIZE = re.compile(r"^\d+(\.\d+)?(b|k|kb|m|mb|bit|kbit|mbit)?$")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def child_env() -> dict[str, str]:
    # one compute thread per process: the processes share the machine's cores
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def worker_memory(preset: str) -> str:
    """The --max-memory each (c)/(d) worker declares: half the blocks fit (either half), the whole
    model does not, so the planner makes 2 stages of 2 replicas (49MiB for tiny, 133MiB for small)."""
    config = load_config(preset)
    profile = model_profile(config.model, config.training.precision, config.training)
    n = profile.n_layer
    half = max(stage_peak(profile, 0, n // 2, "cpu"), stage_peak(profile, n // 2, n, "cpu"))
    return f"{round((half + stage_peak(profile, 0, n, 'cpu')) / 2 / 2**20)}MiB"


def cpu_ticks() -> tuple[int, int, int]:
    """(all, busy, softirq) jiffies of the machine's CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    total = sum(fields[:8])
    return total, total - fields[3] - fields[4], fields[6]


def cpu_share(before: tuple[int, int, int], after: tuple[int, int, int]) -> dict[str, float | None]:
    """How busy the CPUs were between two cpu_ticks(), and the share of softirq: the kernel's
    network work, on the bed mostly its own veths and token buckets ((d) has no buckets)."""
    total = after[0] - before[0]
    if total <= 0:
        return {"cpu_busy": None, "cpu_softirq": None}
    return {"cpu_busy": (after[1] - before[1]) / total, "cpu_softirq": (after[2] - before[2]) / total}


def session_cpu_s(sessions: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the processes of each session in `sessions`
    (session id -> kind; every popen of the bed starts one), the p2p daemons as "<kind> p2pd".
    Where (c)'s CPUs go that (d)'s do not: the workers' Python, their daemons, or the instruments."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        kind = sessions.get(int(rest[3]))  # fields after comm: state ppid pgrp session ... utime(12) stime(13)
        if kind is not None:
            key = f"{kind} p2pd" if comm == "p2pd" else kind
            used[key] = used.get(key, 0.0) + (int(rest[11]) + int(rest[12])) / tick
    return used


def cpu_by_process(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, Any]:
    """CPU seconds per 1,000 trained tokens of each kind of process between two session_cpu_s()."""
    spent = {k: after[k] - before.get(k, 0.0) for k in sorted(after)}
    per_k = {k: round(1000 * v / tokens, 4) if tokens else None for k, v in spent.items()}
    workers = sum(v for k, v in spent.items() if k.startswith("worker"))
    return {"cpu_s_per_ktoken": per_k,
            "worker_cpu_ms_per_ktoken": 1e6 * workers / tokens if tokens else None}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return events


# ---- (a), (b): hivemind data parallel ----------------------------------------------------------


def run_hivemind(mode: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    peers = 2
    window = args.seconds_a if mode == "a" and args.seconds_a is not None else args.seconds
    bed = NetBed(peers, args.rate_mbit, args.subnet, burst=args.burst)
    try:
        bed.create()
        env = child_env()
        peer_logs = [logs / f"peer{i}.jsonl" for i in range(peers)]
        addr_file = logs / "dht0.txt"
        common = [sys.executable, str(PEER_SCRIPT), "--mode", mode, "--peers", str(peers), "--preset", args.preset,
                  "--seconds", str(window + STARTUP_LIMIT_S), "--eval-every", str(args.eval_every),
                  "--go-file", str(logs / "go")]
        procs = [bed.popen(0, [*common, "--index", "0", "--host", bed.address(0), "--log", str(peer_logs[0]),
                               "--addr-file", str(addr_file)], logs / "peer0.log", env)]
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while not addr_file.exists() or not addr_file.read_text().strip():
            _check_alive(procs, logs)
            if time.monotonic() > deadline:
                raise RuntimeError(f"peer 0 did not start its DHT; see {logs / 'peer0.log'}")
            time.sleep(0.2)
        procs.append(bed.popen(1, [*common, "--index", "1", "--host", bed.address(1), "--log", str(peer_logs[1]),
                                   "--initial-peer", addr_file.read_text().strip()], logs / "peer1.log", env))

        while not all(any("ready" in e for e in read_jsonl(p)) for p in peer_logs):
            _check_alive(procs, logs)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the peers were not ready in {STARTUP_LIMIT_S:.0f} s; see {logs}")
            time.sleep(0.2)
        (logs / "go").touch()

        def tokens_now() -> int:
            return sum(max((e["tokens"] for e in read_jsonl(p) if "loss" in e), default=0) for p in peer_logs)

        start = _wait_first_tokens(tokens_now, procs, logs)
        tx0, cpu0 = [bed.tx_bytes(i) for i in range(peers)], cpu_ticks()
        tokens0 = tokens_now()
        last_print = time.monotonic()
        while time.monotonic() - start < window:
            _check_alive(procs, logs)
            time.sleep(0.5)
            if time.monotonic() - last_print >= 10:
                last_print = time.monotonic()
                val = [e["val"] for e in read_jsonl(peer_logs[0]) if "val" in e]
                progress(f"  ({mode}) {time.monotonic() - start:4.0f} s · {tokens_now():,} tokens · "
                         f"val {val[-1] if val else float('nan'):.3f}")
        tx1, cpu1 = [bed.tx_bytes(i) for i in range(peers)], cpu_ticks()
        tokens1 = tokens_now()
        elapsed = time.monotonic() - start
        for proc in procs:
            bed.stop(proc)
    finally:
        bed.destroy()
    # the curve: peer 0's validation losses against the tokens both peers had trained by then
    steps = [[(e["t"], e["tokens"]) for e in read_jsonl(p) if "loss" in e] for p in peer_logs]
    t_first = min((s[0][0] for s in steps if s), default=time.time())
    curve = []
    for e in read_jsonl(peer_logs[0]):
        if "val" in e:
            total = sum(max((tok for t, tok in s if t <= e["t"]), default=0) for s in steps)
            curve.append({"seconds": round(max(0.0, e["t"] - t_first), 2), "tokens": total, "val_loss": e["val"]})
    epochs = max((e.get("epoch", 0) for e in read_jsonl(peer_logs[0])), default=0)
    # each peer's averaging rounds by outcome (slow_links_peer.AveragingOutcomes), as of its last step
    last_steps = [[e for e in read_jsonl(p) if "loss" in e][-1:] for p in peer_logs]
    outcomes = [(s[0].get("together", 0), s[0].get("alone", 0)) if s else (0, 0) for s in last_steps]
    together, alone = sum(o[0] for o in outcomes), sum(o[1] for o in outcomes)
    if together == 0:
        raise RuntimeError(f"the peers never averaged together ({alone} rounds alone): each trained on its "
                           f"own, which is not data parallel; see {logs}")
    return _measurement(mode, tokens1 - tokens0, elapsed, sum(tx1) - sum(tx0), 0, curve,
                        extra={"optimizer_epochs": epochs, "peers": peers, "rounds_together": together,
                               "rounds_alone": alone, **cpu_share(cpu0, cpu1)})


# ---- (c), (d): swarmtrain -----------------------------------------------------------------------


def run_swarm(mode: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    import grpc

    from protos import swarmtrain_pb2 as pb
    from protos import swarmtrain_pb2_grpc as pb_grpc

    workers = 4
    evaluator = workers + 1  # namespace 0: coordinator, 1-4: workers, 5: the evaluator
    # the evaluator is an instrument: its downloads bypass the shaped links, as (a) and (b)
    # evaluate in-process without touching theirs
    bed = NetBed(workers + 2, args.rate_mbit if mode == "c" else None, args.subnet, burst=args.burst,
                 unshaped=(evaluator,))
    channel = None
    try:
        bed.create()
        env = child_env()
        overrides = [arg for kv in args.set for arg in ("--set", kv)]
        coordinator = bed.popen(0, [sys.executable, LAUNCH, "coordinator", "--config", args.preset, *overrides,
                                    "--host", bed.address(0), "--grpc-port", "0", "--dht-port", "0",
                                    "--metrics-port", "0", "--state-dir", str(logs / "coordinator-state")],
                                logs / "coordinator.log", env)
        endpoint = _wait_ready(coordinator, logs / "coordinator.log")
        procs = [coordinator]
        for i in range(workers):
            procs.append(bed.popen(1 + i, [sys.executable, LAUNCH, "worker", "--cpu", "--coordinator", endpoint,
                                           "--host", bed.address(1 + i), "--max-memory", args.worker_memory,
                                           "--link-mbps", f"{args.rate_mbit:g}", "--public-name", f"bench-{i}",
                                           "--trace", str(logs / f"worker{i}.trace.jsonl")],
                                   logs / f"worker{i}.log", env))
        channel = grpc.insecure_channel(endpoint)  # the root namespace reaches the bed through the bridge
        stub = pb_grpc.CoordinatorStub(channel)

        def tokens_now() -> int:
            return stub.GetSwarm(pb.GetSwarmRequest(), timeout=10).progress.trained_tokens

        start = _wait_first_tokens(tokens_now, procs, logs)
        start_wall = time.time()
        eval_log = logs / "evaluator.jsonl"
        evaluating = bed.popen(evaluator, [sys.executable, str(Path(__file__).resolve()), "--role", "swarm-eval",
                                           "--coordinator", endpoint, "--host", bed.address(evaluator), "--preset", args.preset,
                                           "--eval-every", str(args.eval_every), "--out", str(eval_log)],
                               logs / "evaluator.log", env)
        procs.append(evaluating)
        swarm_ns = range(workers + 1)
        sessions = {p.pid: "worker" for p in procs} | {coordinator.pid: "coordinator", evaluating.pid: "evaluator"}
        tx0, cpu0, proc_cpu0 = [bed.tx_bytes(i) for i in swarm_ns], cpu_ticks(), session_cpu_s(sessions)
        rx_eval0 = bed.rx_bytes(evaluator)
        tokens0 = tokens_now()
        last_print = time.monotonic()
        while time.monotonic() - start < args.seconds:
            _check_alive(procs, logs)
            time.sleep(0.5)
            if time.monotonic() - last_print >= 10:
                last_print = time.monotonic()
                swarm = stub.GetSwarm(pb.GetSwarmRequest(), timeout=10)
                stages = "+".join(str(s.active_workers) for s in swarm.stages)
                val = [e["val_loss"] for e in read_jsonl(eval_log)]
                progress(f"  ({mode}) {time.monotonic() - start:4.0f} s · {swarm.progress.trained_tokens:,} tokens · "
                         f"train loss {swarm.progress.last_loss:.3f} · val {val[-1] if val else float('nan'):.3f} · "
                         f"stages {stages}")
        tx1, cpu1, proc_cpu1 = [bed.tx_bytes(i) for i in swarm_ns], cpu_ticks(), session_cpu_s(sessions)
        rx_eval1 = bed.rx_bytes(evaluator)
        tokens1 = tokens_now()
        elapsed = time.monotonic() - start
        final = stub.GetSwarm(pb.GetSwarmRequest(), timeout=10)
        policy = _policy_from_logs(logs, workers)
        for proc in procs[::-1]:  # evaluator, workers (they say goodbye), then the coordinator
            bed.stop(proc, timeout=20)
    finally:
        if channel is not None:
            channel.close()
        bed.destroy()
    curve = [{"seconds": round(max(0.0, e["t"] - start_wall), 2), "tokens": e["tokens"], "val_loss": e["val_loss"]}
             for e in read_jsonl(eval_log)]
    traffic = {pb.TrafficKind.Name(t.kind).removeprefix("TRAFFIC_KIND_").lower(): t.sent_bytes
               for t in final.progress.traffic}
    syncs = sum(1 for i in range(workers) for e in read_jsonl(logs / f"worker{i}.trace.jsonl")
                if e.get("event") == "sync")
    # what the stage boundaries alone moved per token, from the workers' own counts since the start:
    # the floor under (c)'s bytes per token that no averaging scheme can go below
    boundary = traffic.get("activations", 0) + traffic.get("gradients", 0)
    trained = final.progress.trained_tokens
    return _measurement(mode, tokens1 - tokens0, elapsed, sum(tx1) - sum(tx0), rx_eval1 - rx_eval0, curve,
                        extra={"stages": [s.active_workers for s in final.stages], "sync_rounds_traced": syncs,
                               "reported_traffic_bytes": traffic, "assignments": policy,
                               "boundary_bytes_per_token": boundary / trained if trained else None,
                               **cpu_share(cpu0, cpu1), **cpu_by_process(proc_cpu0, proc_cpu1, tokens1 - tokens0)})


def _policy_from_logs(logs: Path, workers: int) -> list[str]:
    lines = []
    for i in range(workers):
        path = logs / f"worker{i}.log"
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        found = [line.strip() for line in text.splitlines() if line.lstrip().startswith("assigned:")]
        if found:
            lines.append(found[-1])
    return lines


def swarm_eval(args: argparse.Namespace) -> int:
    """The evaluator role: every --eval-every s, gather the swarm's model and log its validation loss."""
    import grpc
    import torch
    from hivemind.p2p import P2P

    from protos import swarmtrain_pb2 as pb
    from protos import swarmtrain_pb2_grpc as pb_grpc
    from worker.app.swarm_model import gather_model
    from worker.data.tokens import TokenData
    from worker.runtime.standalone import validation_loss

    torch.set_num_threads(1)
    config = load_config(args.preset)
    training = config.training
    data = TokenData(config.data, training.seq_len, training.seed)
    batches = data.validation_batches(training.micro_batch_size, training.eval_batches)
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(args.coordinator))

    async def loop() -> None:
        # its own P2P on the bed's subnet: a loopback one could not dial the workers
        p2p = await P2P.create(host_maddrs=[f"/ip4/{args.host}/tcp/0"])
        try:
            with args.out.open("a", encoding="utf-8") as out:
                while True:
                    began = time.monotonic()
                    swarm = stub.GetSwarm(pb.GetSwarmRequest(), timeout=10)
                    try:
                        model = await gather_model(p2p, swarm, config, swarm.run_id)
                    except Exception as err:  # noqa: BLE001 - a replica moving or leaving: try again later
                        print(f"gather failed: {type(err).__name__}: {err}", flush=True)
                    else:
                        loss = validation_loss(model, batches, torch.device("cpu"), "fp32")
                        out.write(json.dumps({"t": round(time.time(), 3), "tokens": swarm.progress.trained_tokens,
                                              "val_loss": loss}) + "\n")
                        out.flush()
                    await asyncio.sleep(max(0.0, args.eval_every - (time.monotonic() - began)))
        finally:
            await p2p.shutdown()

    try:
        asyncio.run(loop())
    except KeyboardInterrupt:
        pass
    return 0


# ---- shared ----------------------------------------------------------------------------------------


def _check_alive(procs: list[Any], logs: Path) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"a process exited early ({proc.returncode}): {' '.join(proc.args[4:8])} ...; "
                               f"see the logs in {logs}")


def _wait_ready(proc: Any, log: Path) -> str:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the coordinator exited early; see {log}")
        match = READY.search(log.read_text(encoding="utf-8", errors="replace")) if log.exists() else None
        if match:
            return match.group(1)
        time.sleep(0.3)
    raise RuntimeError(f"the coordinator was not ready in {STARTUP_LIMIT_S:.0f} s; see {log}")


def _wait_first_tokens(tokens_now: Any, procs: list[Any], logs: Path) -> float:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        _check_alive(procs, logs)
        with contextlib.suppress(Exception):  # the control plane may still be starting
            if tokens_now() > 0:
                return time.monotonic()
        time.sleep(0.5)
    raise RuntimeError(f"no tokens trained after {STARTUP_LIMIT_S:.0f} s; see the logs in {logs}")


def _measurement(mode: str, tokens: int, seconds: float, tx: int, eval_rx: int, curve: list[dict[str, Any]],
                 extra: dict[str, Any]) -> dict[str, Any]:
    sent = max(0, tx - eval_rx)  # the evaluator's downloads are the measurement, not the training
    return {"config": mode, "name": NAMES[mode], "window_s": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "bytes_sent": sent,
            "evaluator_bytes_excluded": eval_rx, "bytes_per_token": sent / tokens if tokens else None,
            "curve": curve, **extra}


def val_at(curve: list[dict[str, Any]], tokens: int) -> float | None:
    """Validation loss at `tokens`, linearly interpolated between the evaluations around it."""
    points = sorted((p["tokens"], p["val_loss"]) for p in curve)
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t0 <= tokens <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (tokens - t0) / (t1 - t0)
    return None


def time_to(curve: list[dict[str, Any]], target: float) -> float | None:
    for p in sorted(curve, key=lambda p: p["seconds"]):
        if p["val_loss"] <= target:
            return p["seconds"]
    return None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: dict[str, list[dict[str, Any]]], target: float) -> dict[str, Any]:
    reached = [max((p["tokens"] for p in r["curve"]), default=0) for rs in runs.values() for r in rs]
    common = min(reached) if reached else 0
    table: dict[str, dict[str, Any]] = {}
    for mode, rs in runs.items():
        table[mode] = {
            "name": NAMES[mode],
            "tokens_per_s": _median([r["tokens_per_s"] for r in rs]),
            "bytes_per_token": _median([r["bytes_per_token"] for r in rs]),
            "val_loss_at_common_tokens": _median([val_at(r["curve"], common) for r in rs]),
            "seconds_to_target": _median([time_to(r["curve"], target) for r in rs]),
            "final_val_loss": _median([r["curve"][-1]["val_loss"] if r["curve"] else None for r in rs]),
            "cpu_busy": _median([r.get("cpu_busy") for r in rs]),
            "cpu_softirq": _median([r.get("cpu_softirq") for r in rs]),
        }
        if mode in ("c", "d"):
            table[mode]["boundary_bytes_per_token"] = _median([r.get("boundary_bytes_per_token") for r in rs])
            table[mode]["worker_cpu_ms_per_ktoken"] = _median([r.get("worker_cpu_ms_per_ktoken") for r in rs])

    def ratio(x: str, y: str, key: str) -> float | None:
        a, b = table.get(x, {}).get(key), table.get(y, {}).get(key)
        return a / b if a is not None and b else None

    ratios = {"c_over_a_bytes_per_token": ratio("c", "a", "bytes_per_token"),
              "c_over_d_tokens_per_s": ratio("c", "d", "tokens_per_s"),
              "c_over_a_val_loss": ratio("c", "a", "val_loss_at_common_tokens")}
    # (c) and (d) of one repeat run back to back: the median of their ratios cancels the drift of a
    # shared machine between repeats, which the ratio of the medians keeps (reported beside it)
    pairs = zip(runs.get("c", []), runs.get("d", []), strict=False)
    ratios["c_over_d_tokens_per_s_paired"] = _median(
        [c["tokens_per_s"] / d["tokens_per_s"] for c, d in pairs if c["tokens_per_s"] and d["tokens_per_s"]])
    floor, dp = table.get("c", {}).get("boundary_bytes_per_token"), table.get("a", {}).get("bytes_per_token")
    ratios["c_boundary_over_a_bytes_per_token"] = floor / dp if floor is not None and dp else None
    targets: dict[str, bool | None] = {
        "c_sends_100x_fewer_bytes_per_token_than_a":
            None if ratios["c_over_a_bytes_per_token"] is None else ratios["c_over_a_bytes_per_token"] <= 0.01,
        # one-sided: (c) taking more optimizer steps per token than (a) and ending lower is no miss
        "c_val_loss_within_2pct_of_a":
            None if ratios["c_over_a_val_loss"] is None else ratios["c_over_a_val_loss"] <= 1.02,
        "c_tokens_per_s_at_least_85pct_of_d":
            None if ratios["c_over_d_tokens_per_s"] is None else ratios["c_over_d_tokens_per_s"] >= 0.85,
    }
    if "c" in table and "b" in table:
        tc, tb = table["c"]["seconds_to_target"], table["b"]["seconds_to_target"]
        targets["c_reaches_target_before_b"] = tc is not None and (tb is None or tc < tb)
    return {"common_tokens": common, "per_config": table, "ratios": ratios, "targets": targets}


def print_table(summary: dict[str, Any], target: float) -> None:
    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    common = summary["common_tokens"]
    header = (f"{'config':<50} {'tokens/s':>9} {'bytes/token':>12} {f'val@{common:,}':>14} "
              f"{f'time to {target:g}':>12} {'final val':>9} {'CPU busy':>8} {'softirq':>7}")
    print(header)
    print("-" * len(header))
    for mode, row in summary["per_config"].items():
        print(f"{f'({mode}) ' + row['name']:<50} {fmt(row['tokens_per_s'], ',.0f'):>9} "
              f"{fmt(row['bytes_per_token'], ',.1f'):>12} {fmt(row['val_loss_at_common_tokens'], '.3f'):>14} "
              f"{fmt(row['seconds_to_target'], '.1f') + (' s' if row['seconds_to_target'] is not None else ''):>12} "
              f"{fmt(row['final_val_loss'], '.3f'):>9} {pct(row.get('cpu_busy')):>8} {pct(row.get('cpu_softirq')):>7}")
    r = summary["ratios"]
    print(f"(c)/(a) bytes per token: {fmt(r['c_over_a_bytes_per_token'], '.4f')} · "
          f"(c)/(d) tokens/s: {fmt(r['c_over_d_tokens_per_s'], '.3f')} "
          f"(median of each repeat's: {fmt(r['c_over_d_tokens_per_s_paired'], '.3f')}) · "
          f"(c)/(a) val loss: {fmt(r['c_over_a_val_loss'], '.4f')}")
    print(f"(c)'s stage boundaries alone / (a) bytes per token: {fmt(r['c_boundary_over_a_bytes_per_token'], '.4f')} "
          "(the least (c) could send with these activations)")
    for name, met in summary["targets"].items():
        print(f"  {name}: {'-' if met is None else ('met' if met else 'NOT met')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_slow_links", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate-mbit", type=float, default=20.0, help="link rate each way (default 20)")
    # a diagnostic: a bucket larger than a microbatch's transfer hides the link's rate from the
    # pipeline's bursts, and a small one costs the machine's CPUs some softirq (netbed.py)
    parser.add_argument("--burst", default=DEFAULT_BURST,
                        help=f"token bucket size of each shaped link, in tc's units (default {DEFAULT_BURST})")
    parser.add_argument("--seconds", type=float, default=75.0, help="training window per configuration (default 75)")
    parser.add_argument("--seconds-a", type=float, default=None,
                        help="a longer window for (a), whose tokens come slowly, so that the losses at equal "
                             "tokens are compared past the first seconds of the swarm (default: --seconds)")
    parser.add_argument("--configs", default="a,b,c,d", help="which configurations, comma-separated (default a,b,c,d)")
    parser.add_argument("--target-loss", type=float, default=3.0, help="validation loss to time (default 3.0)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; medians are reported")
    # 4 s: at 8, (c)'s points lay ~130k tokens apart on the steepest part of its curve, where the
    # common token count falls, and the line between two of them overstates the loss there
    parser.add_argument("--eval-every", type=float, default=4.0, help="seconds between validation losses (default 4)")
    parser.add_argument("--preset", default="tiny",
                        help="the model and schedule, a run config preset: tiny (default) or small")
    parser.add_argument("--subnet", default="10.77.0.0/24", help="private subnet of the bed (default 10.77.0.0/24)")
    parser.add_argument("--out", type=Path, default=RESULTS / "slow_links.json")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a coordinator.* override of the preset for (c) and (d), e.g. "
                             "coordinator.compression.overlap_steps=true (repeatable)")
    # internal: the swarm evaluator, started inside a namespace by this script
    parser.add_argument("--role", choices=("bench", "swarm-eval"), default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "swarm-eval":
        return swarm_eval(args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in NAMES]
    if unknown or not configs:
        parser.error(f"--configs: unknown {unknown}; choose from a,b,c,d")
    outside = [kv for kv in args.set if not kv.startswith("coordinator.")]
    if outside:
        parser.error(f"--set {outside[0]}: only coordinator.* keys (the evaluator and (a), (b) use the plain preset)")
    if not TC_SIZE.match(args.burst):
        parser.error(f"--burst {args.burst}: a size in tc's units, e.g. 32kbit, 64kb or 512kbit")
    if not 0 < args.rate_mbit <= 100_000 or args.seconds <= 0 or args.repeat < 1 or (args.seconds_a is not None and args.seconds_a <= 0):
        parser.error("--rate-mbit, --seconds, --seconds-a and --repeat must be positive")
    try:
        args.worker_memory = worker_memory(args.preset)  # read once, for every (c)/(d) worker
    except ConfigError as err:
        parser.error(f"--preset {args.preset}: {err}")
    try:
        check_prerequisites()
    except NetBedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # a kill (SIGTERM) unwinds like Ctrl-C, so the bed's namespaces and processes are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    logs_root = Path(tempfile.mkdtemp(prefix="slow-links-"))
    progress(f"slow-links benchmark ({args.preset}): {','.join(configs)} at {args.rate_mbit:g} Mbit/s (burst {args.burst}), {args.seconds:g} s each, "
             f"x{args.repeat}; logs in {logs_root}")
    runs: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    for rep in range(args.repeat):
        for mode in configs:
            logs = logs_root / f"{mode}{rep}"
            logs.mkdir()
            progress(f"({mode}) {NAMES[mode]}: run {rep + 1} of {args.repeat}")
            try:
                run = run_hivemind(mode, args, logs) if mode in "ab" else run_swarm(mode, args, logs)
            except (RuntimeError, NetBedError) as err:
                progress(f"({mode}) FAILED: {err}")
                failures[f"{mode}{rep}"] = str(err)
                args.keep_logs = True
                continue
            runs.setdefault(mode, []).append(run)
            progress(f"({mode}) {run['tokens']:,} tokens in {run['window_s']:.0f} s = {run['tokens_per_s']:,.0f} tok/s · "
                     f"{run['bytes_sent'] / 1e6:,.1f} MB sent = {run['bytes_per_token'] or 0:,.1f} B/token · "
                     f"last val {run['curve'][-1]['val_loss'] if run['curve'] else float('nan'):.3f} · "
                     f"CPU {100 * (run['cpu_busy'] or 0):.1f}% busy, {100 * (run['cpu_softirq'] or 0):.1f}% softirq"
                     + (f" · rounds {run['rounds_together']} together, {run['rounds_alone']} alone"
                        if "rounds_together" in run else "")
                     + (f" · workers' CPU {run['worker_cpu_ms_per_ktoken']:.0f} ms per 1k tokens"
                        if run.get("worker_cpu_ms_per_ktoken") is not None else ""))
    summary = summarize(runs, args.target_loss)
    result = {"preset": args.preset, "worker_memory": args.worker_memory, "rate_mbit": args.rate_mbit,
              "burst": args.burst,              "seconds": args.seconds, "seconds_a": args.seconds_a or args.seconds,
              "target_loss": args.target_loss, "overrides": args.set,
              "repeat": args.repeat, "cpu_count": os.cpu_count(), "summary": summary, "runs": runs,
              "failures": failures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print()
    print_table(summary, args.target_loss)
    print(f"results: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    if args.keep_logs:
        print(f"logs: {logs_root}")
    else:
        shutil.rmtree(logs_root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
