"""A worker reading its stage of a pretrained checkpoint holds little more than its own stage.

    .venv/bin/python tests/benchmarks/bench_pretrained_load.py [--workdir DIR] [--mode both|download|local]
        [--steps 3] [--shard-size 1GB] [--json FILE]

The bed: a full-width 2-layer GPT-J checkpoint (d_model 4096, ff 16384, 16 heads, rotary 64, vocab
50400: 815.6M parameters) made by transformers in fp16 with `save_pretrained` (safetensors, one
file unless --shard-size), cached in --workdir so reruns reuse it; a coordinator (`--config
gptj-6b`, the model cut to 2 layers, seq 64, batch 2 of 1, fp32, byte tokenizer, no periodic
checkpoints) started with `model.pretrained` on it; two CPU workers capped with --max-memory so
that neither can hold the whole model (configs/memory.py `stage_peak`) and each can hold one of
two stages. --mode both (the default): one worker reads its stage from the checkpoint directory
itself (`--pretrained DIR`), the other downloads its stage's layers from the coordinator
(checkpoint 0, converted to fp32 in the coordinator's state dir); --mode download / local: both
do the same. The planner decides which worker gets which stage.

Every ~0.1 s it samples each worker's Python process (not its P2P daemon child, reported apart)
from /proc/<pid>/status: VmRSS and VmHWM, the kernel's own peak RSS. VmHWM read as the worker's
"resume" trace event appears is its loading peak (everything since the process started: the
framework, building the stage with its random init and averaging anchor, the data, the load);
read after --steps training steps of the swarm it is the training peak. Per worker it prints the
stage, its parameters, those peaks, the memory model's training peak of the stage, the
checkpoint's size on disk and the two bounds of the done-when (loading peak below the stage's
training need x 1.25, and below the checkpoint's size plus the stage's fp32 parameter bytes)
with PASS/FAIL, and how long each phase took. Results go to
tests/benchmarks/results/pretrained_load.json.

The machine must hold two full-width stages training at once (about 10 GB each, see the
arithmetic it prints) besides the coordinator: it refuses to start where MemAvailable is short,
and stops every process it started if MemAvailable falls under --min-available-gib while it runs
(the workers are also made the kernel's first OOM victims). Every process it starts is killed at
the end, on errors and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

RESULTS = Path(__file__).parent / "results"
GIB, GB = 2**30, 1e9
SAMPLE_S = 0.1
# the checkpoint the done-when names: GPT-J 6B's width and vocabulary, two layers
HF_CONFIG = dict(n_layer=2, n_embd=4096, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048, n_inner=16384)
SEQ_LEN = 64
BASE_OVERRIDES = [
    "model.n_layer=2", f"training.seq_len={SEQ_LEN}", "training.micro_batch_size=1",
    "training.precision=fp32", "data.tokenizer=bytes", "data.paths=[]",
    "data.max_corpus_bytes=8000000",  # a few steps need little text: stage 0 reads 8 MB, not the whole corpus
    "coordinator.checkpoint_interval_s=0",  # a checkpoint would copy every stage's state twice more in RAM
    # heartbeats often, but patient: two full-width stages on two cores answer late while they load and step
    "coordinator.heartbeat_interval_s=1", "coordinator.heartbeat_timeout_s=120", "coordinator.lease_s=300",
]
FRAMEWORK_RSS = 0.65 * GIB  # a CPU worker's RSS before it builds a stage (torch, hivemind, its code): measured
COORDINATOR_RSS = 0.6 * GIB  # the coordinator, its DHT child and the P2P daemons, roughly


class BedError(Exception):
    """The machine cannot run the benchmark as asked; the message says why."""


# ---- the checkpoint ------------------------------------------------------------------------


def make_checkpoint(directory: Path, shard_size: str | None) -> None:
    """In this (child) process: a random GPT-J of HF_CONFIG, built and saved in fp16."""
    import torch
    import transformers

    config = transformers.GPTJConfig(**HF_CONFIG)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # built in fp16: 1.6 GB, not 3.3 GB and then a copy
    try:
        model = transformers.GPTJForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory, max_shard_size=shard_size or "50GB", safe_serialization=True)


def checkpoint_dir(workdir: Path, shard_size: str | None) -> Path:
    return workdir / ("checkpoint-fp16" + (f"-shards-{shard_size}" if shard_size else ""))


def ensure_checkpoint(workdir: Path, shard_size: str | None, model: Any) -> tuple[Path, float, bool]:
    """The checkpoint's directory, the seconds making it took (0 if reused), whether it was reused."""
    from configs.pretrained import PretrainedError, open_pretrained

    directory = checkpoint_dir(workdir, shard_size)
    if directory.is_dir():
        try:
            open_pretrained(directory, model)
            return directory, 0.0, True
        except PretrainedError as err:
            print(f"the cached checkpoint is unusable ({err}); making it again", flush=True)
            shutil.rmtree(directory)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    print(f"making the checkpoint in {directory} with transformers (fp16; takes a minute or more) ...", flush=True)
    done = subprocess.run([sys.executable, __file__, "--make-checkpoint", str(staging),
                           *(["--shard-size", shard_size] if shard_size else [])],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BedError(f"making the checkpoint failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    staging.rename(directory)
    open_pretrained(directory, model)
    return directory, time.monotonic() - started, False


# ---- reading /proc -------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RSS by kind (RssAnon, RssFile: mapped files, RssShmem) of `pid` in bytes
    ({} once it is gone)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:", "RssShmem:")):
                    key, value = line.split(":", 1)
                    found[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}
    return found


def mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BedError("no MemAvailable in /proc/meminfo")


def descendants_rss(pid: int) -> int:
    """RSS of every process below `pid` (a worker's P2P daemon), summed."""
    from configs.process_guard import descendants

    total = 0
    for child in descendants(pid):
        total += proc_status(child).get("VmRSS", 0)
    return total


def make_oom_victim(pid: int) -> None:
    """The kernel's OOM killer takes this process first, not someone else's."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
    except OSError:
        pass


def code_version() -> dict[str, Any]:
    """The commit, and the product files changed since it: the numbers are those of this working tree."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=False).stdout  # noqa: E731
    product = ["worker", "coordinator", "configs", "protos"]
    changed = [line[3:] for line in git("status", "--porcelain", "--", *product).splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "changed_files": changed,
            "diff_sha256": hashlib.sha256(git("diff", "HEAD", "--", *product).encode()).hexdigest()[:16]}


# ---- the arithmetic ------------------------------------------------------------------------


def stage_facts(config: Any) -> dict[tuple[int, int], dict[str, int]]:
    """For each span of the model: its parameters, the memory model's peak on a CPU worker, and what
    a lone replica really holds while it trains: weights, gradients, AdamW's two moments and the
    averaging anchor (20 B/param); from a step's second micro-batch on, the transient gradient
    each backward computes before adding it to .grad (worker/pipeline/accumulation.py, 4 B/param);
    the optimizer step's two buffers of the largest tensor. A lone replica per stage never holds a
    round's buffers (pseudo-gradient, residuals), which the memory model counts."""
    from configs.memory import span_memory, stage_peak, training_shape
    from configs.profile import model_profile

    profile = model_profile(config.model, config.training.precision, training=config.training)
    facts = {}
    n = config.model.n_layer
    for span in [(s, e) for s in range(n) for e in range(s + 1, n + 1)]:
        memory = span_memory(config.model, *span, training_shape(config.training, "cpu"))
        params = memory.weights // 4
        accumulates = config.training.batch_size > config.training.micro_batch_size
        facts[span] = {"params": params, "stage_peak": stage_peak(profile, *span, "cpu"),
                       "lone_training": (20 + 4 * accumulates) * params + memory.optimizer_step + memory.activations}
    return facts


# ---- the run -------------------------------------------------------------------------------


class Sampler:
    """Every SAMPLE_S: each worker's VmRSS/VmHWM, the coordinator's, and MemAvailable; stops the
    run (BedError) when MemAvailable falls under the floor."""

    def __init__(self, workers: list[Any], coordinator: Any, floor: int) -> None:
        self.workers, self.coordinator, self.floor = workers, coordinator, floor
        self.started = time.monotonic()
        self.timeline: list[dict[str, Any]] = []
        self.fine: list[list[list[float]]] = [[] for _ in workers]  # every sample while loading: t, rss, anon, file
        self.loading = True
        self.max_rss = [0] * len(workers)
        self.min_available = mem_available()
        self.children_max = [0] * len(workers)
        self._last_children = 0.0

    def sample(self) -> list[dict[str, int]]:
        now = time.monotonic()
        statuses = [proc_status(w.proc.pid) for w in self.workers]
        available = mem_available()
        self.min_available = min(self.min_available, available)
        for i, status in enumerate(statuses):
            self.max_rss[i] = max(self.max_rss[i], status.get("VmRSS", 0))
            if self.loading and status:
                self.fine[i].append([round(now - self.started, 2), status.get("VmRSS", 0), status.get("RssAnon", 0),
                                     status.get("RssFile", 0) + status.get("RssShmem", 0)])
        if now - self._last_children >= 1.0:
            self._last_children = now
            for i, w in enumerate(self.workers):
                self.children_max[i] = max(self.children_max[i], descendants_rss(w.proc.pid))
            coordinator = proc_status(self.coordinator.proc.pid)
            self.timeline.append({"t": round(now - self.started, 2), "available": available,
                                  "coordinator_rss": coordinator.get("VmRSS", 0),
                                  "workers_rss": [s.get("VmRSS", 0) for s in statuses]})
        if available < self.floor:
            raise BedError(f"MemAvailable fell to {available / GIB:.2f} GiB (floor {self.floor / GIB:.2f} GiB): "
                           f"stopped before the kernel's OOM killer would; worker RSS "
                           f"{[round(s.get('VmRSS', 0) / GIB, 2) for s in statuses]} GiB")
        return statuses


def run(args: argparse.Namespace) -> dict[str, Any]:
    from configs.loader import load_config
    from tests.harness.coordinator_process import CoordinatorProcess
    from tests.harness.worker_process import Workers

    phases: dict[str, float] = {}
    version = code_version()
    print(f"code: {version['commit'][:10]}" + (f" + uncommitted changes to {', '.join(version['changed_files'])} "
                                                f"(diff {version['diff_sha256']})" if version["changed_files"] else ""))
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = [*BASE_OVERRIDES, f"training.batch_size={args.batch_size}"]
    config = load_config("gptj-6b", overrides)
    facts = stage_facts(config)
    n = config.model.n_layer
    whole = facts[(0, n)]
    halves = [facts[(0, 1)], facts[(1, 2)]]
    stage_need = max(h["stage_peak"] for h in halves)
    cap = args.max_memory_mib * 2**20 if args.max_memory_mib else math.ceil(stage_need * 1.05 / 2**20) * 2**20
    if not stage_need <= cap < whole["stage_peak"]:
        raise BedError(f"--max-memory {cap / GIB:.2f} GiB must hold one stage ({stage_need / GIB:.2f} GiB) "
                       f"and not the whole model ({whole['stage_peak'] / GIB:.2f} GiB)")
    print(f"the model: {whole['params']:,} parameters; configs.memory stage_peak on a CPU worker: whole model "
          f"{whole['stage_peak'] / GIB:.2f} GiB, stage [0,1) {halves[0]['stage_peak'] / GIB:.2f} GiB "
          f"({halves[0]['params']:,} params), stage [1,2) {halves[1]['stage_peak'] / GIB:.2f} GiB "
          f"({halves[1]['params']:,} params); workers offer --max-memory {cap // 2**20}MiB "
          f"({cap / GIB:.2f} GiB): one stage each, never the whole model")

    # will two training stages and the coordinator fit? the memory model's peaks would not (they
    # count a round's DiLoCo buffers, which a lone replica per stage never allocates): say both
    predicted_both = sum(h["stage_peak"] for h in halves) + COORDINATOR_RSS
    lone_both = sum(h["lone_training"] + FRAMEWORK_RSS for h in halves) + COORDINATOR_RSS
    available = mem_available()
    peaks = " + ".join(f"{h['stage_peak'] / GIB:.2f}" for h in halves)
    print(f"memory: {available / GIB:.1f} GiB available now. Two stages at the memory model's peaks "
          f"({peaks}) + the coordinator ~{COORDINATOR_RSS / GIB:.1f} "
          f"= {predicted_both / GIB:.1f} GiB: {'fits' if predicted_both < available else 'does NOT fit'}; what a lone "
          f"replica per stage holds ({24 if args.batch_size > 1 else 20} B/param + AdamW's step buffers + "
          f"~{FRAMEWORK_RSS / GIB:.2f} GiB framework, "
          f"each) + the coordinator = {lone_both / GIB:.1f} GiB: "
          f"{'fits' if lone_both < available - args.min_available_gib * GIB else 'does NOT fit'}", flush=True)
    need = lone_both + args.min_available_gib * GIB
    if args.steps and available < need:
        deadline = time.monotonic() + args.wait_for_memory_s
        print(f"waiting up to {args.wait_for_memory_s:.0f}s for {need / GIB:.1f} GiB to be available ...", flush=True)
        while available < need and time.monotonic() < deadline:
            time.sleep(5)
            available = mem_available()
        if available < need:
            raise BedError(f"{available / GIB:.1f} GiB available, {need / GIB:.1f} GiB needed to train two "
                           "full-width stages here: free memory, or pass --steps 0 to measure the loading alone")

    started = time.monotonic()
    ckpt, made_s, reused = ensure_checkpoint(workdir, args.shard_size, config.model)
    phases["checkpoint_make_s"] = round(made_s if not reused else time.monotonic() - started, 1)
    from configs.pretrained import open_pretrained

    checkpoint = open_pretrained(ckpt, config.model)
    ckpt_bytes = checkpoint.size_bytes
    print(f"checkpoint {ckpt}: {checkpoint.layout}, {len(set(checkpoint.files.values()))} file(s), "
          f"{ckpt_bytes:,} bytes ({ckpt_bytes / GB:.2f} GB, {ckpt_bytes / GIB:.2f} GiB), dtypes "
          f"{sorted(set(checkpoint.dtypes.values()))}; {'reused' if reused else f'made in {made_s:.0f}s'}", flush=True)

    state = workdir / f"state-{args.mode}"
    shutil.rmtree(state, ignore_errors=True)  # a fresh run: no registry, conversion from scratch
    traces = workdir / f"traces-{args.mode}"
    shutil.rmtree(traces, ignore_errors=True)
    traces.mkdir()
    coordinator = None
    workers = Workers(traces)
    result: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        sets = [a for o in overrides for a in ("--set", o)]
        coordinator = CoordinatorProcess(state, *sets, "--set", f"model.pretrained={ckpt}", config="gptj-6b")
        phases["coordinator_start_s"] = round(time.monotonic() - t0, 1)
        print(f"coordinator ready at {coordinator.endpoint} in {phases['coordinator_start_s']:.1f}s", flush=True)
        kinds = {"both": ["local", "download"], "download": ["download", "download"],
                 "local": ["local", "local"]}[args.mode]
        spawned_at = time.time()
        for kind in kinds:
            extra = ["--pretrained", str(ckpt)] if kind == "local" else []
            worker = workers.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1",
                                   "--max-memory", f"{cap // 2**20}MiB", "--link-mbps", "10000", *extra)
            make_oom_victim(worker.proc.pid)
        sampler = Sampler(list(workers), coordinator, int(args.min_available_gib * GIB))
        per = [{"kind": kind, "pid": w.proc.pid} for kind, w in zip(kinds, workers, strict=True)]

        def check_alive() -> None:
            for i, w in enumerate(workers):
                if w.proc.poll() is not None:
                    raise BedError(f"worker {i} ({kinds[i]}) exited with {w.proc.returncode}:\n{w.output[-4000:]}")
            if coordinator.proc.poll() is not None:
                raise BedError(f"the coordinator exited:\n{coordinator.output[-4000:]}")

        # ---- loading: until both workers wrote "resume"
        deadline = time.monotonic() + args.load_timeout_s
        while any("loading_peak" not in p for p in per):
            statuses = sampler.sample()
            for i, w in enumerate(workers):
                p = per[i]
                if "ready" not in p and (ready := w.events("ready")):
                    p["ready"] = ready[0]
                    p["rss_at_ready"] = statuses[i].get("VmRSS", 0)
                    p["hwm_at_ready"] = statuses[i].get("VmHWM", 0)
                if "loading_peak" not in p and (resumed := w.events("resume")):
                    now = proc_status(w.proc.pid)
                    p["resume"] = resumed[0]
                    p["loading_peak"] = now.get("VmHWM", 0)
                    p["rss_at_resume"] = now.get("VmRSS", 0)
                    p["max_sampled_rss_loading"] = sampler.max_rss[i]
                    p["p2pd_rss_loading"] = sampler.children_max[i]
                    print(f"worker {i} ({kinds[i]}) resumed stage {resumed[0]['stage']} from checkpoint "
                          f"{resumed[0]['checkpoint']} ({resumed[0].get('source', 'sent by the coordinator')}): "
                          f"VmHWM {p['loading_peak'] / GIB:.2f} GiB", flush=True)
            check_alive()
            if time.monotonic() > deadline:
                raise BedError(f"no 'resume' from every worker in {args.load_timeout_s:.0f}s:\n" +
                               "\n".join(f"--- worker {i}:\n{w.output[-3000:]}" for i, w in enumerate(workers)))
            time.sleep(SAMPLE_S)
        loaded_at = time.time()
        sampler.loading = False
        coordinator_after_load = proc_status(coordinator.proc.pid)

        # ---- training: --steps steps on stage 0
        first = next(i for i, p in enumerate(per) if p["resume"]["stage"] == 0)
        steps: list[dict[str, Any]] = []
        deadline = time.monotonic() + args.step_timeout_s * max(1, args.steps)
        while len(steps) < args.steps:
            sampler.sample()
            steps = workers[first].events("step")
            check_alive()
            failed = workers[first].events("step_failed")
            # a refused request is refused again on every retry; other failures (a timeout) may pass
            if any("bad_request" in e.get("error", "") for e in failed) or len(failed) >= 5:
                raise BedError(f"the swarm loaded but cannot train: {len(failed)} failed step(s), the last: "
                               f"{failed[-1].get('error')}")
            if time.monotonic() > deadline:
                raise BedError(f"{len(steps)} of {args.steps} steps in {args.step_timeout_s * args.steps:.0f}s:\n" +
                               "\n".join(f"--- worker {i}:\n{w.output[-3000:]}" for i, w in enumerate(workers)))
            time.sleep(SAMPLE_S)
        if args.steps:
            settle = time.monotonic() + 2.0  # the last stage's optimizer step may trail stage 0's event
            while time.monotonic() < settle:
                sampler.sample()
                time.sleep(SAMPLE_S)
        trained_at = time.time()
        for i, w in enumerate(workers):
            status = proc_status(w.proc.pid)
            per[i]["training_peak"] = status.get("VmHWM", 0) if args.steps else None
            per[i]["p2pd_rss_max"] = sampler.children_max[i]
            per[i]["output_tail"] = w.output.splitlines()[-12:]
        coordinator_final = proc_status(coordinator.proc.pid)
        conversion = sorted((p.name, p.stat().st_mtime) for p in (state / "pretrained").glob("*/layer-*.safetensors"))

        # ---- the verdicts
        rows = []
        for i, p in enumerate(per):
            span = tuple(p["resume"].get("layers") or
                         next(e["layers"] for e in workers[i].events("assign") if e["stage"] == p["resume"]["stage"]))
            fact = facts[span]
            params = fact["params"]
            bound_train = 1.25 * fact["stage_peak"]
            bound_ckpt = ckpt_bytes + 4 * params
            assign = next(e for e in workers[i].events("assign"))
            row = {
                "worker": i, "kind": p["kind"], "source": p["resume"].get("source", "coordinator"),
                "stage": p["resume"]["stage"], "layers": list(span), "params": params,
                "ready_parameters": p["ready"]["parameters"],
                "rss_at_ready": p.get("rss_at_ready"), "hwm_at_ready": p.get("hwm_at_ready"),
                "loading_peak": p["loading_peak"], "rss_at_resume": p["rss_at_resume"],
                "loading_added": p["loading_peak"] - p["rss_at_ready"] if p.get("rss_at_ready") else None,
                "max_sampled_rss_loading": p["max_sampled_rss_loading"],
                "training_peak": p["training_peak"], "stage_peak_predicted": fact["stage_peak"],
                "lone_training_predicted": fact["lone_training"] + FRAMEWORK_RSS,
                "checkpoint_bytes": ckpt_bytes, "stage_fp32_bytes": 4 * params,
                "bound_train": bound_train, "bound_checkpoint": bound_ckpt,
                "pass_train": p["loading_peak"] < bound_train, "pass_checkpoint": p["loading_peak"] < bound_ckpt,
                "p2pd_rss_loading": p["p2pd_rss_loading"], "p2pd_rss_max": p["p2pd_rss_max"],
                "join_to_assign_s": round(assign["time"] - spawned_at, 1),
                "build_s": p["ready"]["seconds"],
                "ready_to_resume_s": round(p["resume"]["time"] - p["ready"]["time"], 1),
                "output_tail": p["output_tail"],
            }
            rows.append(row)
        step_rows = [{"step": e["step"], "loss": e["loss"], "seconds": e.get("seconds"),
                      "since_loaded_s": round(e["time"] - loaded_at, 1)} for e in steps[: args.steps]]
        phases["spawn_to_both_resumed_s"] = round(loaded_at - spawned_at, 1)
        phases["resumed_to_steps_s"] = round(trained_at - loaded_at, 1)
        result = {
            "mode": args.mode, "code": version, "checkpoint": str(ckpt), "checkpoint_layout": checkpoint.layout,
            "checkpoint_files": len(set(checkpoint.files.values())), "checkpoint_bytes": ckpt_bytes,
            "checkpoint_reused": reused, "model_params": whole["params"], "max_memory_bytes": cap,
            "overrides": overrides, "pythonpath": os.environ.get("PYTHONPATH"), "mem_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "mem_available_at_start": available, "mem_available_min": sampler.min_available,
            "coordinator_hwm_after_load": coordinator_after_load.get("VmHWM", 0),
            "coordinator_hwm_final": coordinator_final.get("VmHWM", 0),
            "conversion_files": [{"name": name, "written_after_spawn_s": round(mtime - spawned_at, 1)}
                                 for name, mtime in conversion],
            "workers": rows, "steps": step_rows, "phases": phases, "timeline": sampler.timeline,
            "loading_samples": {"columns": ["t_s", "rss", "rss_anon", "rss_file_and_shmem"], "workers": sampler.fine},
        }
        end_version = code_version()
        if end_version != version:
            print(f"warning: the product code changed while this ran (diff {version['diff_sha256']} -> "
                  f"{end_version['diff_sha256']}): rerun for numbers of one version", flush=True)
            result["code_at_end"] = end_version
        return result
    finally:
        workers.kill_all()
        if coordinator is not None:
            coordinator.kill()


def report(result: dict[str, Any]) -> bool:
    g = lambda b: f"{b / GIB:.2f}" if b is not None else "-"  # noqa: E731
    print()
    print(f"checkpoint: {result['checkpoint_bytes']:,} bytes = {result['checkpoint_bytes'] / GB:.2f} GB "
          f"({result['checkpoint_layout']}, {result['checkpoint_files']} file(s), fp16, "
          f"{result['model_params']:,} params); workers capped at {result['max_memory_bytes'] / GIB:.2f} GiB; "
          "RSS of each worker's Python process (its P2P daemon apart), GiB")
    head = (f"{'worker':<14}{'stage':>6}{'params':>13}{'built':>7}{'load pk':>8}{'+load':>7}{'train pk':>9}{'model pk':>9}"
            f"{'need×1.25':>10}{'':>5}{'ckpt+stage':>11}{'':>5}{'p2pd':>6}")
    print(head)
    ok = True
    for r in result["workers"]:
        verdict = lambda b: "PASS" if b else "FAIL"  # noqa: E731
        ok &= r["pass_train"] and r["pass_checkpoint"]
        print(f"{r['worker']}:{r['source']:<12}{r['stage']:>6}{r['params']:>13,}{g(r['rss_at_ready']):>7}"
              f"{g(r['loading_peak']):>8}{g(r['loading_added']):>7}{g(r['training_peak']):>9}{g(r['stage_peak_predicted']):>9}"
              f"{g(r['bound_train']):>10}{verdict(r['pass_train']):>5}{g(r['bound_checkpoint']):>11}"
              f"{verdict(r['pass_checkpoint']):>5}{g(r['p2pd_rss_max']):>6}")
    print("built: VmRSS when the stage was built (random init + anchor), before loading; load pk: VmHWM at the "
          "'resume' event; +load: load pk - built; train pk: VmHWM after the steps; model pk: configs.memory.stage_peak (cpu); "
          "need×1.25 and ckpt+stage (checkpoint bytes + the stage's fp32 parameter bytes): the done-when's bounds "
          "for the loading peak")
    for r in result["workers"]:
        print(f"worker {r['worker']} ({r['source']}): joined -> assigned {r['join_to_assign_s']:.1f}s, stage built "
              f"in {r['build_s']:.1f}s, built -> resumed {r['ready_to_resume_s']:.1f}s")
    for s in result["steps"]:
        print(f"step {s['step']}: loss {s['loss']:.3f}, {s['seconds']}s, {s['since_loaded_s']:.1f}s after both resumed")
    phases = ", ".join(f"{k} {v}" for k, v in result["phases"].items())
    print(f"phases: {phases}")
    print(f"coordinator VmHWM {result['coordinator_hwm_final'] / GIB:.2f} GiB; lowest MemAvailable "
          f"{result['mem_available_min'] / GIB:.2f} GiB of {result['mem_total'] / GIB:.1f}; conversion files "
          f"{[(c['name'], c['written_after_spawn_s']) for c in result['conversion_files']]}")
    print(f"done-when: {'every bound holds' if ok else 'NOT every bound holds'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/swarmtrain-bench-pretrained"),
                        help="where the checkpoint is cached and the coordinator's state and traces go")
    parser.add_argument("--mode", choices=["both", "download", "local"], default="both",
                        help="both: one worker reads --pretrained, one downloads; or both do the same")
    parser.add_argument("--steps", type=int, default=3, help="training steps after loading (0: loading only)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="training.batch_size, in micro-batches of 1 (1: no accumulation buffer, ~1.5 GiB less a worker)")
    parser.add_argument("--shard-size", default=None, help="save_pretrained's max_shard_size, e.g. 1GB (default: one file)")
    parser.add_argument("--max-memory-mib", type=int, default=None,
                        help="the workers' --max-memory (default: the larger stage's stage_peak + 5%%)")
    parser.add_argument("--load-timeout-s", type=float, default=1200.0)
    parser.add_argument("--step-timeout-s", type=float, default=600.0, help="per step")
    parser.add_argument("--min-available-gib", type=float, default=0.75,
                        help="stop everything if MemAvailable falls below this")
    parser.add_argument("--wait-for-memory-s", type=float, default=300.0,
                        help="how long to wait at the start for enough memory to be available")
    parser.add_argument("--json", type=Path, default=RESULTS / "pretrained_load.json")
    parser.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.shard_size)
        return 0

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    try:
        result = run(args)
    except BedError as err:
        print(f"bench_pretrained_load: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every process it started was killed", file=sys.stderr)
        return 130
    result["phases"]["total_s"] = round(time.monotonic() - started, 1)
    ok = report(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.json)
    print(f"results: {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
