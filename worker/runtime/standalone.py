"""Train the whole model in one process: the reference a swarm's loss curve is compared to.

`worker --standalone` runs this. It uses the same model, data, schedule and optimizer
settings as a swarm worker, so a swarm run and a local run of one config are comparable
step for step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from configs.pretrained import PretrainedCheckpoint
from configs.schema import RunConfig, TrainingConfig
from worker.data.prepared import PreparedData
from worker.data.tokens import TokenData
from worker.model.gptj import GPTJ, init_parameters, lm_loss
from worker.model.precision import autocast_for
from worker.model.pretrained import load_pretrained
from worker.model.schedule import learning_rate_at, total_steps

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainingReport:
    steps: int
    tokens: int
    seconds: float
    parameters: int
    initial_validation_loss: float
    final_validation_loss: float
    final_train_loss: float
    model: torch.nn.Module | None = field(default=None, compare=False, repr=False)  # the trained model

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def build_optimizer(model: torch.nn.Module, training: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; biases and LayerNorm gains are not decayed."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        fused=False,
    )


@torch.no_grad()
def validation_loss(model: GPTJ, batches: list[Batch], device: torch.device, precision: str) -> float:
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        with autocast_for(device, precision):
            total += lm_loss(model(inputs.to(device)), targets.to(device)).item()
    model.train()
    return total / len(batches)


def train_locally(
    config: RunConfig,
    data: TokenData | PreparedData,
    device: torch.device,
    *,
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
    log_interval_s: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    pretrained: PretrainedCheckpoint | None = None,
) -> TrainingReport:
    """Train `config`'s model on `data` for its token budget (or `max_steps`; 0 trains nothing)
    and report. `pretrained` (opened and checked by the caller) replaces the seed's weights."""
    training = config.training
    torch.manual_seed(training.seed)  # dropout only: weights come from init_parameters
    model = GPTJ(config.model)
    if pretrained is not None:
        started = time.perf_counter()
        read = load_pretrained(model, pretrained)
        log(f"weights: {pretrained.directory} ({read / 1e9:.2f} GB read in {time.perf_counter() - started:.1f}s)")
    else:
        init_parameters(model, training.seed, config.model.init_std)
    model.to(device)
    optimizer = build_optimizer(model, training)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and training.precision == "fp16")
    accumulation = training.batch_size // training.micro_batch_size
    steps = min(total_steps(training), max_steps) if max_steps is not None else total_steps(training)
    val_batches = data.validation_batches(training.micro_batch_size, training.eval_batches)
    parameters = sum(p.numel() for p in model.parameters())

    initial_val = validation_loss(model, val_batches, device, training.precision)
    log(f"start: {parameters:,} parameters · {steps} steps of {training.tokens_per_step:,} tokens · "
        f"validation loss {initial_val:.3f}")

    status = _StatusLine(steps, training.tokens_per_step, log, log_interval_s or config.worker.log_interval_s)
    micro_batches: Iterator[Batch] = data.train_batches(training.micro_batch_size)
    val_loss, train_loss = initial_val, math.nan
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, training)
        step_loss = 0.0
        for _ in range(accumulation):
            inputs, targets = next(micro_batches)
            with autocast_for(device, training.precision):
                loss = lm_loss(model(inputs.to(device)), targets.to(device)) / accumulation
            scaler.scale(loss).backward()
            step_loss += loss.item()
        if training.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        train_loss = step_loss
        if on_step is not None:
            on_step(step + 1, train_loss)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"training loss became {train_loss} at step {step + 1}: lower training.learning_rate"
            )
        last = step + 1 == steps
        if (step + 1) % training.eval_interval_steps == 0 or last:
            val_loss = validation_loss(model, val_batches, device, training.precision)
        status.update(step + 1, train_loss, val_loss, optimizer.param_groups[0]["lr"], force=last)
    seconds = time.perf_counter() - started
    return TrainingReport(
        steps=steps,
        tokens=steps * training.tokens_per_step,
        seconds=seconds,
        parameters=parameters,
        initial_validation_loss=initial_val,
        final_validation_loss=val_loss,
        final_train_loss=train_loss,
        model=model,
    )


class _StatusLine:
    """One readable progress line every few seconds: step, loss, throughput, time left."""

    def __init__(self, steps: int, tokens_per_step: int, log: Callable[[str], None], interval_s: float) -> None:
        self.steps, self.tokens_per_step, self.log, self.interval_s = steps, tokens_per_step, log, interval_s
        self.started = self.last_print = time.perf_counter()

    def update(self, step: int, train_loss: float, val_loss: float, lr: float, *, force: bool) -> None:
        now = time.perf_counter()
        if not force and now - self.last_print < self.interval_s:
            return
        self.last_print = now
        elapsed = now - self.started
        rate = step * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        eta = (self.steps - step) * elapsed / step if step else 0.0
        self.log(
            f"step {step:>{len(str(self.steps))}}/{self.steps} · loss {train_loss:.3f} · val {val_loss:.3f} · "
            f"{rate:,.0f} tok/s · lr {lr:.2e} · eta {_duration(eta)}"
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_report(report: TrainingReport) -> str:
    return (
        f"done: {report.tokens:,} tokens in {_duration(report.seconds)} ({report.tokens_per_second:,.0f} tok/s) · "
        f"validation loss {report.initial_validation_loss:.3f} → {report.final_validation_loss:.3f}"
    )
