"""Learning-rate schedule: linear warmup, then cosine decay to a floor (pure)."""

from __future__ import annotations

import math

from configs.schema import TrainingConfig


def total_steps(training: TrainingConfig) -> int:
    """Optimizer steps the token budget buys (at least one)."""
    return max(1, math.ceil(training.total_tokens / training.tokens_per_step))


def learning_rate_at(step: int, training: TrainingConfig) -> float:
    """The rate for optimizer step `step` (0-based); past the budget it stays at the floor."""
    peak, floor = training.learning_rate, training.min_learning_rate
    if step < training.warmup_steps:
        return peak * (step + 1) / training.warmup_steps
    decay_steps = max(1, total_steps(training) - training.warmup_steps)
    progress = min(1.0, (step - training.warmup_steps) / decay_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
