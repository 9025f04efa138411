"""The report `coordinator plan` prints: what a run costs, offline, from the config and the catalog.

`plan_report()` does all the arithmetic first (coordinator.costs.model) and raises before
returning any text when a fleet or a datacenter cannot hold the model, so that the command
prints either a whole report or one error line.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from configs.catalog import CatalogError, GpuCatalog, GpuSpec
from configs.fleet import FleetGroup
from configs.memory import span_memory, training_shape
from configs.profile import ModelProfile, model_profile
from configs.schema import RunConfig
from coordinator.costs.model import (
    DEFAULT_MFU,
    DatacenterEstimate,
    RunCost,
    SwarmEstimate,
    estimate_datacenter,
    estimate_swarm,
    inference_flops,
    layers_that_fit,
    stage_gpus,
    train_memory,
)
from coordinator.planning.compression_policy import heaviest_activation_ratio
from coordinator.planning.margins import TIGHT_MEMORY, stage_margins
from coordinator.planning.pipeline_rate import PipelineEstimate, Schedule, schedule_of, state_download_s
from coordinator.planning.plan import Plan
from coordinator.planning.rate_model import Costs, Fleet

__all__ = ["DATACENTER_GPUS", "parse_datacenter", "parse_mfu", "parse_tokens", "plan_report"]

DATACENTER_GPUS = 8  # one cloud instance's worth, when --datacenter names no count

GIB = 2**30


def parse_tokens(text: str) -> int:
    """'3.53e9', '3_530_000_000' or '3530000000' -> 3530000000."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--tokens {text!r}: expected a number of tokens, e.g. 3.53e9") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"--tokens {text!r}: must be at least 1")
    return round(value)


def parse_mfu(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise ValueError(f"--mfu {text!r}: expected a fraction of peak FLOP/s in (0, 1], e.g. {DEFAULT_MFU}")
    return value


def parse_datacenter(text: str, catalog: GpuCatalog, where: str = "--datacenter") -> tuple[GpuSpec, int]:
    """'A100-80GB:8' -> (that card, 8); 'A100-80GB' alone means DATACENTER_GPUS of them.

    `where` names the flag or config key the text came from, for the error message.
    """
    gpu_id, sep, count_text = text.partition(":")
    count = DATACENTER_GPUS
    if sep:
        try:
            count = int(count_text)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{where} {text!r}: expected GPU:COUNT with a positive count, e.g. A100-80GB:8")
    try:
        return catalog.get(gpu_id), count
    except CatalogError as err:
        raise ValueError(f"{where} {text!r}: {err}") from None


# ----------------------------------------------------------------------------- the report


def plan_report(config: RunConfig, catalog: GpuCatalog, *, datacenter: tuple[GpuSpec, int],
                fleet: Sequence[FleetGroup] | None = None, fleet_name: str = "fleet",
                mfu: float = DEFAULT_MFU) -> str:
    """Everything below the run summary. Raises InfeasiblePlanError if the fleet or the
    datacenter GPUs cannot hold the model."""
    precision = config.training.precision
    tokens = config.training.total_tokens
    usd_per_kwh = config.metrics.energy_usd_per_kwh
    profile = model_profile(config.model, precision, config.training,
                            overlap_steps=config.coordinator.compression.overlap_steps)
    dc = estimate_datacenter(profile, *datacenter, tokens, precision=precision, usd_per_kwh=usd_per_kwh, mfu=mfu)
    ratio = heaviest_activation_ratio(config.coordinator.compression)
    schedule = schedule_of(config.training, config.coordinator.compression)
    swarm = None
    if fleet is not None:
        swarm = estimate_swarm(profile, fleet, tokens, precision=precision, usd_per_kwh=usd_per_kwh, mfu=mfu,
                               activation_ratio=ratio, schedule=schedule)
    sections = [
        _memory(profile, precision),
        _catalog_fit(profile, catalog, precision),
        *([_swarm_plan(config, profile, swarm, fleet, fleet_name, ratio, schedule)] if swarm and fleet else []),
        _comparison(tokens, swarm, dc, usd_per_kwh),
        _assumptions(dc, mfu, precision, swarm is not None),
    ]
    return "\n\n".join(sections)


def _memory(profile: ModelProfile, precision: str) -> str:
    one = train_memory(1, precision)
    master = f" + fp32 master {one.master_weights}" if one.master_weights else ""
    total = profile.total
    rows = [
        ("per layer", profile.blocks[0].params, profile.blocks[0].train_memory_bytes, ""),
        ("embedding", profile.embedding.params, profile.embedding.train_memory_bytes, "with the first stage"),
        ("head", profile.head.params, profile.head.train_memory_bytes, "ln_f + lm_head, with the last stage"),
        ("whole model", total.params, total.train_memory_bytes, f"{profile.n_layer} layers"),
    ]
    return "\n".join([
        f"inference: {inference_flops(total.params, 1):.3g} FLOPs per token (2 × parameters)",
        "",
        (f"memory to train at {precision}: {one.total} B/parameter = weights {one.weights} + gradients "
         f"{one.gradients}{master} + Adam {one.optimizer}, resident; a stage's peak adds activations and the "
         "optimizer step's buffers (configs/memory.py), and the tables below count it"),
        *(f"  {name:<12} {_count(params):>6} parameters  {_gib(nbytes):>10}  {note}".rstrip()
          for name, params, nbytes, note in rows),
    ])


def _catalog_fit(profile: ModelProfile, catalog: GpuCatalog, precision: str) -> str:
    header = (f"  {'GPU':<12} {'kind':<10} {'memory':>9} {f'{precision} peak':>15} {'$/h':>6}   "
              f"{'alone':>6} {'+embedding':>11} {'+head':>6}   whole model")
    lines = [("layers one catalog GPU holds for training, at the stage's peak within its memory less the CUDA "
              "context (a middle stage alone, the first stage with the embedding, the last with the head)"), header]
    for gpu in catalog:
        fit = layers_that_fit(profile, gpu.memory_bytes)
        lines.append(
            f"  {gpu.id:<12} {gpu.kind:<10} {_gib(gpu.memory_bytes):>9} {gpu.peak(precision) / 1e12:>7.1f} TFLOP/s "
            f"{gpu.usd_per_hour:>6.2f}   {fit.middle:>6} {fit.first:>11} {fit.last:>6}   "
            f"{'yes' if fit.whole_model else 'no'}"
        )
    return "\n".join(lines)


def _swarm_plan(config: RunConfig, profile: ModelProfile, swarm: SwarmEstimate, fleet: Sequence[FleetGroup],
                fleet_name: str, ratio: float, schedule: Schedule) -> str:
    gpus = sum(g.count for g in fleet)
    links = sorted({g.link_mbps for g in fleet})
    link = f"{links[0]:,g} Mbit/s links" if len(links) == 1 else f"links of {links[0]:,g}-{links[-1]:,g} Mbit/s"
    p = swarm.plan
    lines = [
        f"fleet {fleet_name}: {gpus} GPUs on {link}: " + ", ".join(f"{g.count}× {g.gpu.id}" for g in fleet),
        (f"plan: {p.num_stages} stage{'s' if p.num_stages != 1 else ''} · {gpus - swarm.idle} GPUs used, "
         f"{swarm.idle} idle · activations at {ratio:.3g}× raw size on the wire (the policy's heaviest codec)"),
        (f"  {'stage':>5}  {'layers':<12} {'peak':>10} {'of card':>8} "
         f"{'tokens/s':>10} {'link use':>9} {'bound':>8}   GPUs"),
    ]
    margins = stage_margins(profile, swarm.workers, p)
    shape = training_shape(config.training, "cuda", config.coordinator.compression.overlap_steps)
    host = 0
    for s, margin in enumerate(margins):
        start, end = p.boundaries[s], p.boundaries[s + 1]
        span = f"{start}-{end - 1} ({end - start})" if end - start > 1 else f"{start} (1)"
        bound = "slowest" if p.stage_rates[s] == p.rate and p.num_stages > 1 else ""
        host = max(host, span_memory(config.model, start, end, shape).host)
        lines.append(f"  {s:>5}  {span:<12} {_gib(margin.memory_bytes):>10} {margin.memory_use:>7.0%}"
                     f"{'!' if margin.tight else ' '} {p.stage_rates[s]:>10,.0f} {margin.link_use:>9.0%} "
                     f"{margin.bound:>8}   {_gpu_counts(stage_gpus(swarm, s))}{'  (' + bound + ')' if bound else ''}")
    lines.append("  peak: parameters, gradients, Adam, activations of "
                 f"{shape.in_flight} micro-batches in flight, autocast copies and the optimizer step (configs/memory.py), "
                 "of what the smallest card serving the stage offers less the CUDA context and framework; "
                 "link use: the busiest link's share at the plan's rate")
    tight = [m.stage for m in margins if m.tight]
    if tight:
        lines.append(f"  ! stage{'s' if len(tight) > 1 else ''} {', '.join(map(str, tight))} peak above "
                     f"{TIGHT_MEMORY:.0%} of a card's usable memory: little room for a longer sequence or allocator spikes")
    lines.append(f"  host RAM: each worker also keeps its stage's averaging state (anchor, residuals, a round's "
                 f"pseudo-gradient) on the CPU: up to {_gib(host)}")
    if swarm.pipeline is not None:
        costs, workers = Costs.for_workers(profile, swarm.workers), Fleet(swarm.workers)
        lines += _pipeline(swarm.pipeline, schedule, p,
                           [state_download_s(costs, workers, p, s) for s in range(p.num_stages)])
    return "\n".join(lines)


def _pipeline(est: PipelineEstimate, schedule: Schedule, p: Plan, downloads: list[float]) -> list[str]:
    per_driver = f"{schedule.microbatches_per_step} micro-batch{'es' if schedule.microbatches_per_step > 1 else ''}"
    return [
        (f"  pipeline: {est.drivers} first-stage replica{'s' if est.drivers > 1 else ''} each drive {per_driver} "
         f"a step, {schedule.in_flight} in flight: a round trip through the {p.num_stages} stage"
         f"{'s' if p.num_stages > 1 else ''} takes {est.round_trip_s:.2g} s, a step {est.step_s:.3g} s; expected "
         f"{est.rate:,.0f} tokens/s, {est.efficiency:.0%} of the slowest stage's {est.slowest_stage_rate:,.0f} "
         f"(averaging keeps {schedule.averaging_share:.0%} of replicated stages' links)"),
        (f"  joining: a newcomer fetches its stage's parameters in {min(downloads):.2g}-{max(downloads):.2g} s "
         "over the fastest holder's link"),
        *_fill_hint(est, schedule),
    ]


def _fill_hint(est: PipelineEstimate, schedule: Schedule) -> list[str]:
    """When too few micro-batches in flight leave the pipeline idle, how many would fill it."""
    b = schedule.tokens_per_microbatch
    needed = math.ceil(est.round_trip_s / (est.drivers * b / est.slowest_stage_rate))
    if est.efficiency >= 0.8 or needed <= schedule.in_flight:
        return []
    return [(f"  ! {schedule.in_flight} micro-batches in flight per first-stage replica leave the stages idle; "
             f"about {needed} would fill this pipeline (--set training.microbatches_in_flight=N: each stage then "
             "holds that many micro-batches' activations, and the plan changes to fit them)")]


def _comparison(tokens: int, swarm: SwarmEstimate | None, dc: DatacenterEstimate, usd_per_kwh: float) -> str:
    columns: list[tuple[str, RunCost]] = []
    if swarm is not None:
        columns.append((f"swarm: {swarm.cost.gpus} GPUs", swarm.cost))
    columns.append((f"datacenter: {dc.cost.gpus}× {dc.gpu.id}", dc.cost))
    rows = [
        ("tokens/s", lambda c: f"{c.tokens_per_s:,.0f}"),
        ("wall time", lambda c: _duration(c.seconds)),
        ("GPU-hours", lambda c: _num(c.gpu_hours)),
        ("rent at hourly prices", lambda c: _usd(c.rent_usd)),
        ("energy (GPU board power)", lambda c: f"{_num(c.energy_kwh)} kWh"),
        (f"energy at ${usd_per_kwh:g}/kWh", lambda c: _usd(c.energy_usd)),
    ]
    width = max(len(name) for name, _ in rows)
    col = max(22, *(len(title) + 2 for title, _ in columns))
    heading = f"for {_count(tokens)} tokens"
    lines = [f"{heading:<{width + 2}}" + "".join(f"{title:>{col}}" for title, _ in columns)]
    lines += [f"  {name:<{width}}" + "".join(f"{show(c):>{col}}" for _, c in columns) for name, show in rows]
    return "\n".join(lines)


def _assumptions(dc: DatacenterEstimate, mfu: float, precision: str, with_swarm: bool) -> str:
    n, gpu = dc.cost.gpus, dc.gpu.id
    if dc.sharded:
        need, have = _gib(dc.whole_peak), _gib(dc.gpu.memory_bytes)
        layout = [
            f"  datacenter: data parallel; training the whole model peaks at {need}, more than one {gpu} ({have}),",
            (f"    so its state is split across the {n} GPUs (ZeRO-3 / FSDP-style, {_gib(dc.memory_per_gpu)} "
             "each; activations recomputed in the backward);"),
            "    gradient and shard traffic overlaps compute",
        ]
    else:
        layout = [(f"  datacenter: plain data parallel, a full replica on each of the {n} {gpu}s; "
                   "gradient traffic overlaps compute")]
    lines = [
        "assumptions:",
        f"  achieved FLOP/s = {mfu:g} × {precision} peak on every GPU (model-FLOPs utilisation; --mfu to change)",
        *layout,
    ]
    if with_swarm:
        lines += [
            "  swarm: the planner's slowest stage (compute, and activation traffic on each link), at the share",
            "    the pipeline's schedule keeps of it (fill and drain each step, micro-batches in flight,",
            "    averaging's share of the links); churn is not counted",
        ]
    lines += [
        "  energy: GPU board power × wall time (no host, cooling or PSU losses); rental prices include power",
        "  prices: configs/gpus.yaml or a fleet entry's usd_per_hour; energy: metrics.energy_usd_per_kwh",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- formatting


def _gpu_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n}× {gpu}" for gpu, n in counts.most_common())


def _count(n: float) -> str:
    """6050882784 -> '6.05B': how people say model and dataset sizes."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(int(n))


def _gib(nbytes: float) -> str:
    """Binary units throughout, as GPU memory is sold: an "80GB" card holds 80 GiB."""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if nbytes >= scale:
            return f"{_num(nbytes / scale)} {unit}"
    return f"{nbytes:.0f} B"


def _num(x: float) -> str:
    """Three significant digits, trailing zeros kept: 9.00, 90.2, 925, 0.000123."""
    return f"{x:,.0f}" if x >= 100 else f"{x:#.3g}"


def _usd(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:.2f}" if x >= 0.01 else f"${x:.2g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{_num(seconds)} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"
