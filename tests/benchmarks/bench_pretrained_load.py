"""A worker reading its stage of a pretrained checkpoint holds little more than its own stage.

    .venv/bin/python tests/benchmarks/bench_pretrained_load.py [--workdir DIR] [--mode both|download|local]
        [--steps 3] [--batch-size 1] [--shard-size 1GB] [--json FILE]

The bed: a full-width 2-layer GPT-J checkpoint (d_model 4096, ff 16384, 16 heads, rotary 64,
vocab 50400: 815.6M parameters) made by transformers in fp16 with `save_pretrained`
(safetensors, one file unless --shard-size), cached in --workdir so that reruns reuse it; a
coordinator (`--config gptj-6b`, the model cut to 2 layers, seq 64, micro-batch 1, --batch-size
micro-batches a step, fp32, byte tokenizer, no periodic checkpoints) started with
`model.pretrained` on it; two CPU workers whose --max-memory lets neither hold the whole model
(configs/memory.py `stage_peak`) and each hold one of two stages. --mode both (the default): one
worker reads its stage from the checkpoint directory itself (`--pretrained DIR`), the other
downloads its stage's layers from the coordinator (checkpoint 0, converted to fp32 into the
coordinator's state dir); --mode download / local: both do the same. The planner decides which
worker gets which stage.

Every ~0.1 s it samples each worker's Python process (its P2P daemon, a child, is reported apart)
from /proc/<pid>/status: VmRSS and VmHWM, the kernel's own peak RSS. VmHWM read as the worker's
"resume" trace event appears is its loading peak: everything since the process started (the
framework, the stage built with its random weights and averaging anchor, stage 0's data, the
load). Read after --steps steps of the swarm it is the training peak. Per worker it prints the
stage, its parameters, those peaks, the memory model's training peak for the stage, the
checkpoint's size on disk and the done-when's two bounds for the loading peak (the stage's
training need x 1.25; the checkpoint's size plus the stage's fp32 parameter bytes) with
PASS/FAIL, and how long each phase took. Results go to tests/benchmarks/results/pretrained_load.json,
with the commit and any uncommitted product changes the numbers are of.

Memory: the machine holds two full-width stages training at once besides the coordinator: ~10
GiB each at their peaks with --batch-size 1, ~12 GiB with 2 (from a step's second micro-batch on,
each backward adds a transient gradient of the stage), the two peaking in turn. On 24 GB that
left ~4 GiB free at 1 and ~2 at 2. It prints the arithmetic, waits (--wait-for-memory-s) or
refuses where MemAvailable is short, stops everything it started if MemAvailable falls under
--min-available-gib, and makes its workers the kernel's first OOM victims. Every process it
starts is killed at the end, on errors and on Ctrl-C or SIGTERM too.
"""

from __future__ import annotations

import argparse
import hashlib
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

RESULTS = Path(__file__).parent / "results"
GIB, GB = 2**30, 1e9
SAMPLE_S = 0.1
MEMORY_POLL_S = 5.0  # while waiting for memory to free up
# the checkpoint the done-when names: GPT-J 6B's width and vocabulary, two layers
HF_CONFIG = {"n_layer": 2, "n_embd": 4096, "n_head": 16, "rotary_dim": 64, "vocab_size": 50400,
             "n_positions": 2048, "n_inner": 16384}
BASE_OVERRIDES = [
    "model.n_layer=2", "training.seq_len=64", "training.micro_batch_size=1", "training.precision=fp32",
    "data.tokenizer=bytes", "data.paths=[]",
    "data.max_corpus_bytes=8000000",  # a few steps need little text: stage 0 reads 8 MB, not the corpus
    "coordinator.checkpoint_interval_s=0",  # a checkpoint would copy each stage's state twice more in RAM
    # heartbeats often, but patient: full-width stages on two cores answer late while they load and step
    "coordinator.heartbeat_interval_s=1", "coordinator.heartbeat_timeout_s=120", "coordinator.lease_s=300",
]
FRAMEWORK_RSS = 0.65 * GIB  # a CPU worker's RSS besides its stage (torch, hivemind, its code), roughly
COORDINATOR_RSS = 0.6 * GIB  # the coordinator, its DHT child and the P2P daemons, roughly
PRODUCT = ["worker", "coordinator", "configs", "protos"]
LOADING_COLUMNS = ["t_s", "rss", "rss_anon", "rss_file_and_shmem"]


class BedError(Exception):
    """The benchmark cannot go on as asked; the message says why."""


# ---- the checkpoint ------------------------------------------------------------------------


def make_checkpoint(directory: Path, shard_size: str | None) -> None:
    """In this (child) process: a random GPT-J of HF_CONFIG, built and saved in fp16."""
    import torch
    import transformers

    config = transformers.GPTJConfig(**HF_CONFIG)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # built in fp16: 1.6 GB, not 3.3 GB and a converted copy
    try:
        model = transformers.GPTJForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory, max_shard_size=shard_size or "50GB", safe_serialization=True)


def ensure_checkpoint(workdir: Path, shard_size: str | None, model: Any) -> tuple[Path, float]:
    """The checkpoint's directory, and the seconds making it took (0: reused from `workdir`)."""
    from configs.pretrained import PretrainedError, open_pretrained

    directory = workdir / ("checkpoint-fp16" + (f"-shards-{shard_size}" if shard_size else ""))
    if directory.is_dir():
        try:
            open_pretrained(directory, model)
            return directory, 0.0
        except PretrainedError as err:
            print(f"the cached checkpoint is unusable ({err}); making it again", flush=True)
            shutil.rmtree(directory)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    print(f"making the checkpoint in {directory} with transformers (fp16, a minute or so) ...", flush=True)
    done = subprocess.run([sys.executable, __file__, "--make-checkpoint", str(staging),
                           *(["--shard-size", shard_size] if shard_size else [])],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BedError(f"making the checkpoint failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    staging.rename(directory)
    open_pretrained(directory, model)
    return directory, time.monotonic() - started


# ---- this machine --------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RSS by kind (RssAnon; RssFile: mapped files; RssShmem) of `pid`, in bytes;
    {} once it is gone."""
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

    return sum(proc_status(child).get("VmRSS", 0) for child in descendants(pid))


def make_oom_victim(pid: int) -> None:
    """The kernel's OOM killer takes this process first, not someone else's."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
    except OSError:
        pass


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout


def code_version() -> dict[str, Any]:
    """The commit and the product files changed since: the numbers are those of this working tree.
    `product` changes only with the product's code (not with tests or docs committed meanwhile)."""
    diff = git("diff", "HEAD", "--", *PRODUCT)
    trees = git("rev-parse", *(f"HEAD:{folder}" for folder in PRODUCT))
    return {"commit": git("rev-parse", "HEAD").strip(),
            "changed_files": [line[3:] for line in git("status", "--porcelain", "--", *PRODUCT).splitlines()],
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16],
            "product": hashlib.sha256((trees + diff).encode()).hexdigest()[:16]}


# ---- the arithmetic ------------------------------------------------------------------------


def stage_facts(config: Any) -> dict[tuple[int, int], dict[str, int]]:
    """For each span of the model: its parameters, the memory model's peak on a CPU worker, and
    what a lone replica of it holds at its peak: weights, gradients, AdamW's two moments and the
    averaging anchor (20 B/param); from a step's second micro-batch on, the gradient each
    backward computes before adding it to .grad (worker/pipeline/accumulation.py: 4 B/param); the
    optimizer step's two buffers of the largest tensor. A lone replica of a stage never holds a
    round's buffers (pseudo-gradient, residuals), which the memory model counts."""
    from configs.memory import span_memory, stage_peak, training_shape
    from configs.profile import model_profile

    profile = model_profile(config.model, config.training.precision, training=config.training)
    accumulates = config.training.batch_size > config.training.micro_batch_size
    n, facts = config.model.n_layer, {}
    for span in [(s, e) for s in range(n) for e in range(s + 1, n + 1)]:
        memory = span_memory(config.model, *span, training_shape(config.training, "cpu"))
        params = memory.weights // 4
        lone = (20 + 4 * accumulates) * params + memory.optimizer_step + memory.activations
        facts[span] = {"params": params, "stage_peak": stage_peak(profile, *span, "cpu"), "lone_peak": lone}
    return facts


def check_memory(facts: dict, batch_size: int, floor: float, wait_s: float, train: bool) -> int:
    """Print whether two stages and the coordinator fit; wait for the memory, or refuse. In a
    pipeline the stages peak in turn (the last stage's backward and step, then the first's): one
    at its peak, the other holding 20 B/param. Returns MemAvailable."""
    halves = [facts[(0, 1)], facts[(1, 2)]]
    model_both = sum(h["stage_peak"] for h in halves) + COORDINATOR_RSS
    lone = [h["lone_peak"] + FRAMEWORK_RSS for h in halves]
    steady = [20 * h["params"] + FRAMEWORK_RSS for h in halves]
    need = max(lone[0] + steady[1], lone[1] + steady[0]) + COORDINATOR_RSS
    available = mem_available()
    fits = lambda total: "fits" if total < available - floor else "does NOT fit"
    peaks = " + ".join(f"{h['stage_peak'] / GIB:.2f}" for h in halves)
    print(f"memory: {available / GIB:.1f} GiB available. Two stages at the memory model's peaks "
          f"({peaks} GiB) + the coordinator "
          f"~{COORDINATOR_RSS / GIB:.1f} = {model_both / GIB:.1f} GiB: {fits(model_both)}. A lone replica "
          f"per stage at its peak: {24 if batch_size > 1 else 20} B/param + AdamW's step buffers + the "
          f"framework ~{FRAMEWORK_RSS / GIB:.2f} = {max(lone) / GIB:.2f} GiB, the other stage meanwhile "
          f"20 B/param + the framework = {max(steady) / GIB:.2f} GiB; with the coordinator "
          f"{need / GIB:.1f} GiB: {fits(need)}",
          flush=True)
    if not train or available >= need + floor:
        return available
    print(f"waiting up to {wait_s:.0f}s for {(need + floor) / GIB:.1f} GiB to be available ...", flush=True)
    deadline = time.monotonic() + wait_s
    while available < need + floor and time.monotonic() < deadline:
        time.sleep(MEMORY_POLL_S)
        available = mem_available()
    if available < need + floor:
        raise BedError(f"{available / GIB:.1f} GiB available, {(need + floor) / GIB:.1f} GiB needed to train "
                       "two full-width stages: free memory, or measure the loading alone (--steps 0)")
    return available


# ---- the run -------------------------------------------------------------------------------


class Sampler:
    """Every call: each worker's VmRSS (and kinds) and MemAvailable; each second also the P2P
    daemons' and the coordinator's RSS. Raises BedError when MemAvailable falls under `floor`."""

    def __init__(self, workers: list[Any], coordinator: Any, floor: int) -> None:
        self.workers, self.coordinator, self.floor = workers, coordinator, floor
        self.started = time.monotonic()
        self.loading = True
        self.fine: list[list[list[int | float]]] = [[] for _ in workers]  # while loading: LOADING_COLUMNS
        self.timeline: list[dict[str, Any]] = []  # each second
        self.max_rss = [0] * len(workers)
        self.children_max = [0] * len(workers)
        self.min_available = mem_available()
        self._second = 0.0

    def sample(self) -> list[dict[str, int]]:
        now = time.monotonic()
        statuses = [proc_status(w.proc.pid) for w in self.workers]
        available = mem_available()
        self.min_available = min(self.min_available, available)
        for i, s in enumerate(statuses):
            self.max_rss[i] = max(self.max_rss[i], s.get("VmRSS", 0))
            if self.loading and s:
                self.fine[i].append([round(now - self.started, 2), s.get("VmRSS", 0), s.get("RssAnon", 0),
                                     s.get("RssFile", 0) + s.get("RssShmem", 0)])
        if now - self._second >= 1.0:
            self._second = now
            for i, w in enumerate(self.workers):
                self.children_max[i] = max(self.children_max[i], descendants_rss(w.proc.pid))
            self.timeline.append({"t": round(now - self.started, 2), "available": available,
                                  "coordinator_rss": proc_status(self.coordinator.proc.pid).get("VmRSS", 0),
                                  "workers_rss": [s.get("VmRSS", 0) for s in statuses]})
        if available < self.floor:
            raise BedError(f"MemAvailable fell to {available / GIB:.2f} GiB (floor {self.floor / GIB:.2f}): "
                           f"stopped before the OOM killer would; worker RSS "
                           f"{[round(s.get('VmRSS', 0) / GIB, 2) for s in statuses]} GiB")
        return statuses


def tails(workers: list[Any]) -> str:
    return "\n".join(f"--- worker {i}:\n{w.output[-3000:]}" for i, w in enumerate(workers))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from configs.loader import load_config
    from configs.pretrained import open_pretrained
    from tests.harness.coordinator_process import CoordinatorProcess
    from tests.harness.worker_process import Workers

    version = code_version()
    print(f"code: {version['commit'][:10]}" + (f" + uncommitted {', '.join(version['changed_files'])}"
                                                if version["changed_files"] else ""))
    overrides = [*BASE_OVERRIDES, f"training.batch_size={args.batch_size}"]
    config = load_config("gptj-6b", overrides)
    facts = stage_facts(config)
    whole, halves = facts[(0, 2)], [facts[(0, 1)], facts[(1, 2)]]
    one_stage = max(h["stage_peak"] for h in halves)
    cap = args.max_memory_mib * 2**20 if args.max_memory_mib else math.ceil(one_stage * 1.05 / 2**20) * 2**20
    if not one_stage <= cap < whole["stage_peak"]:
        raise BedError(f"--max-memory-mib: {cap / GIB:.2f} GiB must hold one stage "
                       f"({one_stage / GIB:.2f} GiB) and not the whole model "
                       f"({whole['stage_peak'] / GIB:.2f} GiB)")
    print(f"model: {whole['params']:,} parameters; configs.memory stage_peak on a CPU worker: the whole "
          f"model {whole['stage_peak'] / GIB:.2f} GiB, stage [0,1) {halves[0]['stage_peak'] / GIB:.2f} GiB "
          f"({halves[0]['params']:,} params), stage [1,2) {halves[1]['stage_peak'] / GIB:.2f} GiB "
          f"({halves[1]['params']:,} params); each worker offers --max-memory {cap // 2**20}MiB: one stage, "
          "never the whole model")
    floor = args.min_available_gib * GIB
    available = check_memory(facts, args.batch_size, floor, args.wait_for_memory_s, args.steps > 0)

    phases: dict[str, float] = {}
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, made_s = ensure_checkpoint(args.workdir, args.shard_size, config.model)
    phases["checkpoint_make_s"] = round(made_s, 1)  # 0: reused
    checkpoint = open_pretrained(ckpt, config.model)
    ckpt_bytes, shards = checkpoint.size_bytes, len(set(checkpoint.files.values()))
    print(f"checkpoint {ckpt}: {checkpoint.layout}, {shards} file(s), {ckpt_bytes:,} bytes "
          f"({ckpt_bytes / GB:.2f} GB), {sorted(set(checkpoint.dtypes.values()))}; "
          + (f"made in {made_s:.0f}s" if made_s else "reused"), flush=True)

    state, traces = args.workdir / f"state-{args.mode}", args.workdir / f"traces-{args.mode}"
    for folder in (state, traces):  # a fresh run: no registry, the conversion from scratch
        shutil.rmtree(folder, ignore_errors=True)
    traces.mkdir()
    kinds = {"both": ["local", "download"], "download": ["download"] * 2, "local": ["local"] * 2}[args.mode]
    coordinator = None
    workers = Workers(traces)
    try:
        started = time.monotonic()
        coordinator = CoordinatorProcess(state, *(a for o in overrides for a in ("--set", o)),
                                         "--set", f"model.pretrained={ckpt}", config="gptj-6b")
        phases["coordinator_start_s"] = round(time.monotonic() - started, 1)
        print(f"coordinator ready at {coordinator.endpoint} in {phases['coordinator_start_s']:.1f}s",
              flush=True)
        spawned_at = time.time()
        for kind in kinds:
            worker = workers.spawn("--coordinator", coordinator.endpoint, "--host", "127.0.0.1",
                                   "--max-memory", f"{cap // 2**20}MiB", "--link-mbps", "10000",
                                   *(["--pretrained", str(ckpt)] if kind == "local" else []))
            make_oom_victim(worker.proc.pid)
        sampler = Sampler(list(workers), coordinator, int(floor))
        per: list[dict[str, Any]] = [{"kind": kind} for kind in kinds]

        def check_alive() -> None:
            for i, w in enumerate(workers):
                if w.proc.poll() is not None:
                    raise BedError(f"worker {i} ({kinds[i]}) exited ({w.proc.returncode}):\n"
                                   f"{w.output[-4000:]}")
            if coordinator.proc.poll() is not None:
                raise BedError(f"the coordinator exited:\n{coordinator.output[-4000:]}")

        # ---- loading: until both workers wrote "resume"; VmHWM then is the loading peak
        deadline = time.monotonic() + args.load_timeout_s
        while any("loading_peak" not in p for p in per):
            statuses = sampler.sample()
            for i, (w, p) in enumerate(zip(workers, per, strict=True)):
                if "ready" not in p and (ready := w.events("ready")):
                    p["ready"], p["rss_at_ready"] = ready[0], statuses[i].get("VmRSS", 0)
                if "loading_peak" not in p and (resumed := w.events("resume")):
                    now = proc_status(w.proc.pid)
                    p.update(resume=resumed[0], loading_peak=now.get("VmHWM", 0),
                             rss_at_resume=now.get("VmRSS", 0), max_sampled_rss=sampler.max_rss[i])
                    print(f"worker {i} ({kinds[i]}) resumed stage {resumed[0]['stage']} from checkpoint "
                          f"{resumed[0]['checkpoint']} ({resumed[0].get('source', 'from the coordinator')}): "
                          f"VmHWM {p['loading_peak'] / GIB:.2f} GiB", flush=True)
            check_alive()
            if time.monotonic() > deadline:
                raise BedError(f"not every worker resumed in {args.load_timeout_s:.0f}s:\n{tails(workers)}")
            time.sleep(SAMPLE_S)
        loaded_at, sampler.loading = time.time(), False
        coordinator_hwm_loading = proc_status(coordinator.proc.pid).get("VmHWM", 0)

        # ---- training: --steps steps driven by stage 0; VmHWM then is the training peak
        first = next(i for i, p in enumerate(per) if p["resume"]["stage"] == 0)

        def train() -> list[dict[str, Any]]:
            steps: list[dict[str, Any]] = []
            deadline = time.monotonic() + args.step_timeout_s * max(1, args.steps)
            while len(steps) < args.steps:
                sampler.sample()
                steps = workers[first].events("step")
                check_alive()
                failed = workers[first].events("step_failed")
                # a refused request is refused again on every retry; other failures (a timeout) may pass
                if any("bad_request" in e.get("error", "") for e in failed) or len(failed) >= 5:
                    last = failed[-1].get("error", "")
                    raise BedError(f"the swarm loaded but cannot train: {len(failed)} failed step(s), the "
                                   f"last: {last}")
                if time.monotonic() > deadline:
                    raise BedError(f"{len(steps)} of {args.steps} steps in "
                                   f"{args.step_timeout_s * args.steps:.0f}s:\n{tails(workers)}")
                time.sleep(SAMPLE_S)
            settle = time.monotonic() + (2.0 if args.steps else 0.0)  # the last stage steps after stage 0
            while time.monotonic() < settle:
                sampler.sample()
                time.sleep(SAMPLE_S)
            return steps

        training_error = None
        try:
            steps = train()
        except BedError as err:  # the loading's numbers stand: report them, and this
            training_error, steps = str(err), workers[first].events("step")
            print(f"training failed: {training_error}", flush=True)
        trained_at = time.time()
        for p, w in zip(per, workers, strict=True):
            trained = args.steps and not training_error
            p["training_peak"] = proc_status(w.proc.pid).get("VmHWM") if trained else None
        if training_error:
            workers.kill_all()
        coordinator_hwm = proc_status(coordinator.proc.pid).get("VmHWM", 0)
        converted = sorted((f.name, round(f.stat().st_mtime - spawned_at, 1))
                           for f in (state / "pretrained").glob("*/layer-*.safetensors"))

        rows = []
        for i, (p, w) in enumerate(zip(per, workers, strict=True)):
            if (p["kind"] == "local") != (p["resume"].get("source") == "local"):
                source = p["resume"].get("source", "the coordinator")
                raise BedError(f"worker {i} ({p['kind']}) resumed from {source}")
            assign = next(e for e in w.events("assign") if e["stage"] == p["resume"]["stage"])
            fact = facts[tuple(assign["layers"])]
            params = fact["params"]
            bound_train, bound_checkpoint = 1.25 * fact["stage_peak"], ckpt_bytes + 4 * params
            rows.append({
                "worker": i, "kind": p["kind"], "stage": p["resume"]["stage"], "layers": assign["layers"],
                "params": params, "rss_at_ready": p["rss_at_ready"], "loading_peak": p["loading_peak"],
                "loading_added": p["loading_peak"] - p["rss_at_ready"], "rss_at_resume": p["rss_at_resume"],
                "max_sampled_rss_loading": p["max_sampled_rss"], "training_peak": p["training_peak"],
                "stage_peak_predicted": fact["stage_peak"],
                "lone_peak_predicted": fact["lone_peak"] + FRAMEWORK_RSS, "stage_fp32_bytes": 4 * params,
                "bound_train": bound_train, "bound_checkpoint": bound_checkpoint,
                "pass_train": p["loading_peak"] < bound_train,
                "pass_checkpoint": p["loading_peak"] < bound_checkpoint,
                "p2pd_rss_max": sampler.children_max[i],
                "spawn_to_assign_s": round(assign["time"] - spawned_at, 1), "build_s": p["ready"]["seconds"],
                "ready_to_resume_s": round(p["resume"]["time"] - p["ready"]["time"], 1),
                "output_tail": w.output.splitlines()[-12:],
            })
        phases["spawn_to_both_resumed_s"] = round(loaded_at - spawned_at, 1)
        phases["resumed_to_last_step_s"] = round(trained_at - loaded_at, 1)
        result = {
            "mode": args.mode, "code": version, "checkpoint": str(ckpt),
            "checkpoint_layout": checkpoint.layout, "checkpoint_files": shards,
            "checkpoint_bytes": ckpt_bytes, "model_params": whole["params"], "max_memory_bytes": cap,
            "overrides": overrides, "pythonpath": os.environ.get("PYTHONPATH"),
            "mem_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "mem_available_at_start": available, "mem_available_min": sampler.min_available,
            "coordinator_hwm_loading": coordinator_hwm_loading, "coordinator_hwm": coordinator_hwm,
            "converted_layers_s_after_spawn": converted, "workers": rows, "training_error": training_error,
            "steps": [{"step": e["step"], "loss": e["loss"], "seconds": e.get("seconds"),
                       "after_resume_s": round(e["time"] - loaded_at, 1)} for e in steps[: args.steps]],
            "phases": phases, "timeline": sampler.timeline,
            "loading_samples": {"columns": LOADING_COLUMNS, "workers": sampler.fine},
        }
        end = code_version()
        if end["product"] != version["product"]:
            print(f"warning: the product code changed while this ran ({version['commit'][:10]} "
                  f"{version['changed_files']} -> {end['commit'][:10]} {end['changed_files']}): rerun for "
                  "numbers of one version", flush=True)
            result["code_at_end"] = end
        return result
    finally:
        workers.kill_all()
        if coordinator is not None:
            coordinator.kill()


def report(result: dict[str, Any]) -> bool:
    """Print the table; whether every bound holds."""
    g = lambda b: f"{b / GIB:.2f}" if b is not None else "-"
    verdict = lambda ok: "PASS" if ok else "FAIL"
    print(f"\ncheckpoint: {result['checkpoint_bytes']:,} bytes = {result['checkpoint_bytes'] / GB:.2f} GB "
          f"({result['checkpoint_layout']}, {result['checkpoint_files']} file(s), fp16, "
          f"{result['model_params']:,} params). GiB, of each worker's Python process (not its P2P daemon):")
    print(f"{'worker':<12}{'stage':>6}{'params':>13}{'built':>7}{'load pk':>8}{'+load':>7}{'train pk':>9}"
          f"{'model pk':>9}{'need×1.25':>10}{'':>5}{'ckpt+stage':>11}{'':>5}{'p2pd':>6}")
    ok = True
    for r in result["workers"]:
        ok &= r["pass_train"] and r["pass_checkpoint"]
        print(f"{r['worker']}:{r['kind']:<10}{r['stage']:>6}{r['params']:>13,}{g(r['rss_at_ready']):>7}"
              f"{g(r['loading_peak']):>8}{g(r['loading_added']):>7}{g(r['training_peak']):>9}"
              f"{g(r['stage_peak_predicted']):>9}{g(r['bound_train']):>10}{verdict(r['pass_train']):>5}"
              f"{g(r['bound_checkpoint']):>11}{verdict(r['pass_checkpoint']):>5}{g(r['p2pd_rss_max']):>6}")
    print("built: VmRSS once the stage is built (random weights + anchor), before it loads; load pk: "
          "VmHWM at 'resume'; +load: load pk - built; train pk: VmHWM after the steps; model pk: "
          "configs.memory stage_peak (cpu); need×1.25, ckpt+stage (checkpoint bytes + the stage's fp32 "
          "bytes): the bounds")
    for r in result["workers"]:
        print(f"worker {r['worker']} ({r['kind']}): spawned -> assigned {r['spawn_to_assign_s']:.1f}s, stage "
              f"built in {r['build_s']:.1f}s, built -> resumed {r['ready_to_resume_s']:.1f}s")
    for s in result["steps"]:
        print(f"step {s['step']}: loss {s['loss']:.3f}, {s['seconds']:.1f}s, "
              f"{s['after_resume_s']:.1f}s after both resumed")
    print("phases: " + ", ".join(f"{k} {v}" for k, v in result["phases"].items()))
    print(f"coordinator VmHWM {result['coordinator_hwm'] / GIB:.2f} GiB; layers converted (s after spawn) "
          f"{result['converted_layers_s_after_spawn']}; lowest MemAvailable "
          f"{result['mem_available_min'] / GIB:.2f} of {result['mem_total'] / GIB:.1f} GiB")
    built_over = [r["worker"] for r in result["workers"] if r["rss_at_ready"] >= r["bound_checkpoint"]]
    if built_over:
        print(f"note: worker(s) {built_over} held more than ckpt+stage before loading anything (the "
              "framework, the stage's random weights and its anchor: twice its fp32 bytes): a worker that "
              "builds its stage before it loads cannot meet that bound")
    if result["training_error"]:
        print(f"training: FAILED after {len(result['steps'])} step(s): {result['training_error']}")
    print(f"done-when: {'every bound holds' if ok else 'NOT every bound holds'}"
          + ("; the swarm did NOT train" if result["training_error"] else ""))
    return ok and not result["training_error"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/swarmtrain-bench-pretrained"),
                        help="the cached checkpoint, the coordinator's state and the traces")
    parser.add_argument("--mode", choices=["both", "download", "local"], default="both",
                        help="both: one worker reads --pretrained, one downloads; else both do the same")
    parser.add_argument("--steps", type=int, default=3, help="training steps after loading (0: load only)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="micro-batches of 1 a step; 2 adds a transient gradient of the stage to each "
                             "worker's peak (~1.5-2 GiB here)")
    parser.add_argument("--shard-size", help="save_pretrained's max_shard_size, e.g. 1GB (default: one file)")
    parser.add_argument("--max-memory-mib", type=int,
                        help="the workers' --max-memory (default: the larger stage's stage_peak + 5%%)")
    parser.add_argument("--load-timeout-s", type=float, default=1200.0)
    parser.add_argument("--step-timeout-s", type=float, default=600.0, help="per step")
    parser.add_argument("--min-available-gib", type=float, default=0.75,
                        help="stop everything when MemAvailable falls under this")
    parser.add_argument("--wait-for-memory-s", type=float, default=300.0,
                        help="how long to wait at the start for the memory training needs")
    parser.add_argument("--json", type=Path, default=RESULTS / "pretrained_load.json")
    parser.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.shard_size)
        return 0

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminated)
    started = time.monotonic()
    try:
        result = run(args)
    except BedError as err:
        print(f"bench_pretrained_load: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every process it started is killed", file=sys.stderr)
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
