"""What a pipeline stage really holds while it trains, term by term, on its device and in host RAM.

Pure arithmetic over the model's shape and the run's training settings, for the planner (which
stage fits which card), `coordinator plan`, and `tests/benchmarks/bench_memory.py`, which checks
it against real training steps. Every coefficient below is what this code base's modules do,
measured with autograd's saved-tensor hooks and peak RSS (see the benchmark):

- A stage's module stays fp32 at every precision (worker/runtime/standalone.py): weights 4,
  gradients 4, AdamW's two moments 8 B/param. Under bf16/fp16 autocast (CUDA only) the forward
  casts each weight to 2 bytes and keeps the copy for the backward: +2 B/param.
- AdamW (fused=False) needs temporary buffers while it steps: on CUDA one parameter-sized buffer
  for all parameters at once (the foreach path's sqrt of the second moment); on CPU, one tensor
  at a time, two buffers the size of the largest tensor (sqrt, then its division). The step runs
  after the backward has freed the activations, so the peak is the larger of the two, not their
  sum.
- Activations: what autograd saves per token of a micro-batch, per block: 24·d + 8·ff bytes in
  fp32; 23·d + 4·ff under autocast. Attention's scores (T² per head) are kept only where the
  attention runs its math path: with dropout (12 bytes per head per T²). PyTorch's fused SDPA
  kernels keep none. A stage holds as many micro-batches at once as the first stage's driver
  has in flight (worker/pipeline/driver.py): a step's micro-batches, at most
  training.microbatches_in_flight, and as many of the next step's again when steps overlap. A stage
  after the first also keeps each one's input; the last stage only one micro-batch, since its
  forward and backward come in one call (forward_backward).
- The last stage's logits: the fp32 logits, their log-softmax and the gradient, 12 B per token
  and vocabulary entry (16 under autocast: the bf16 logits are widened to fp32 first).
- DiLoCo (worker/replicas/diloco.py) keeps its state on the CPU whatever the device, 4 B/param
  per term: the anchor; the error-feedback residual of what it sends (kept whatever the codec);
  while a round runs, its pseudo-gradient; as a round's leader, the residual of its broadcast
  and the outer momentum (when `training.outer_momentum` > 0). On a GPU worker that is host RAM;
  on a CPU worker the same RAM as the rest.
- Fixed costs come off what a worker offers, not per stage (`usable_memory`): the framework
  (torch and the worker's code, ~0.4 GiB of RSS on CPU), the CUDA context and cuBLAS workspace
  (~0.75 GiB, outside PyTorch's allocator) and the caching allocator's fragmentation (~5%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from configs.profile import ModelProfile, block_params, embedding_params, head_params
from configs.schema import ModelConfig, TrainingConfig

Device = Literal["cpu", "cuda"]

MICROBATCHES_IN_FLIGHT = 4  # a driver's default (training.microbatches_in_flight; worker/pipeline/driver.py)
FP32 = 4
AUTOCAST_COPY = 2  # bytes per weight of the bf16/fp16 copy autocast keeps for the backward
FRAMEWORK_BYTES = {"cpu": 400 * 2**20, "cuda": 400 * 2**20 + 768 * 2**20}  # + the CUDA context
ALLOCATOR_SLACK = {"cpu": 0.0, "cuda": 0.05}  # the caching allocator's fragmentation
ACTIVATION_COEFFS = {False: (24, 8), True: (23, 4)}  # autocast -> bytes per (d, ff) per token
SCORE_BYTES = 12  # per head and T^2, where attention materialises its scores (the math path)
LOGIT_BYTES = {False: 12, True: 16}  # per token and vocabulary entry on the last stage


@dataclass(frozen=True)
class TrainingShape:
    """What besides the parameters sets a stage's memory: precision, micro-batch, where it runs."""

    precision: str = "fp32"
    seq_len: int = 2048
    micro_batch: int = 1
    device: Device = "cuda"
    in_flight: int = MICROBATCHES_IN_FLIGHT
    outer_momentum: bool = False  # training.outer_momentum > 0: a leader keeps a momentum buffer
    leads: bool = True  # may lead its stage's rounds (any replica may): the broadcast's residual

    @property
    def autocast(self) -> bool:
        return self.device == "cuda" and self.precision in ("bf16", "fp16")

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


@dataclass(frozen=True)
class StageMemory:
    """Bytes a stage holds at its peak, by term. `device` is on the GPU (or RAM, on a CPU)."""

    weights: int
    gradients: int
    optimizer: int
    autocast_copies: int
    activations: int  # all micro-batches in flight, logits included
    optimizer_step: int  # the AdamW step's temporary buffer
    diloco: int  # anchor, outer momentum, residuals, a round's pseudo-gradient: always host RAM
    device_type: Device

    @property
    def resident(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def device(self) -> int:
        """The device's peak: the backward with every micro-batch in flight, or the optimizer step."""
        backward = self.resident + self.autocast_copies + self.activations
        peak = max(backward, self.resident + self.optimizer_step)
        return peak + (self.diloco if self.device_type == "cpu" else 0)

    @property
    def host(self) -> int:
        """Host RAM beyond the framework's, on a GPU worker (on a CPU worker it is in `device`)."""
        return self.diloco if self.device_type == "cuda" else 0


def block_activation_bytes(model: ModelConfig, shape: TrainingShape) -> int:
    """What one block saves for its backward, for one micro-batch."""
    per_d, per_ff = ACTIVATION_COEFFS[shape.autocast]
    saved = shape.tokens * (per_d * model.d_model + per_ff * model.inner_dim)
    if model.dropout > 0:  # SDPA falls back to its math path, which keeps the T x T scores
        saved += shape.micro_batch * SCORE_BYTES * model.n_head * shape.seq_len**2
    return saved


def usable_memory(offered_bytes: int, device: Device) -> int:
    """What of a worker's memory a stage may use: less the framework (and CUDA context) and the
    allocator's slack."""
    return max(0, int((offered_bytes - FRAMEWORK_BYTES[device]) * (1 - ALLOCATOR_SLACK[device])))


def span_memory(model: ModelConfig, start: int, end: int, shape: TrainingShape) -> StageMemory:
    """The stage holding blocks [start, end) of `model`, with the embedding at 0 and the head at the end."""
    if not 0 <= start < end <= model.n_layer:
        raise ValueError(f"stage [{start}, {end}) is not a non-empty part of [0, {model.n_layer})")
    first, last = start == 0, end == model.n_layer
    params = (end - start) * block_params(model)
    params += embedding_params(model) * first + head_params(model) * last
    largest = max([model.d_model * model.inner_dim] + [model.vocab_size * model.d_model] * (first or last))
    activations = (end - start) * block_activation_bytes(model, shape)
    if not first:  # the boundary's input is kept, with its gradient, for the hidden-state gradient sent back
        activations += 2 * FP32 * shape.tokens * model.d_model
    if last:
        activations += LOGIT_BYTES[shape.autocast] * shape.tokens * model.vocab_size
    step = FP32 * (params if shape.device == "cuda" else 2 * largest)
    # anchor, residual, a round's pseudo-gradient; a leader's residual and momentum
    diloco = FP32 * params * (3 + int(shape.leads) * (1 + int(shape.outer_momentum)))
    return StageMemory(
        weights=FP32 * params, gradients=FP32 * params, optimizer=2 * FP32 * params,
        autocast_copies=AUTOCAST_COPY * params if shape.autocast else 0,
        activations=(1 if last else shape.in_flight) * activations, optimizer_step=step, diloco=diloco,
        device_type=shape.device,
    )


def microbatches_in_flight(training: TrainingConfig, overlap_steps: bool = False) -> int:
    """How many micro-batches a pipeline's stages hold at once: a step's, at most
    training.microbatches_in_flight; with overlapping steps the next step's as many again."""
    per_step = min(training.microbatches_in_flight, training.batch_size // training.micro_batch_size)
    return per_step * (2 if overlap_steps else 1)


def training_shape(training: TrainingConfig, device: Device, overlap_steps: bool = False) -> TrainingShape:
    """A run's TrainingShape on `device`."""
    return TrainingShape(precision=training.precision, seq_len=training.seq_len,
                         micro_batch=training.micro_batch_size, device=device,
                         in_flight=microbatches_in_flight(training, overlap_steps),
                         outer_momentum=training.outer_momentum > 0)


def stage_peak(profile: ModelProfile, start: int, end: int, device: Device) -> int:
    """What the planner reserves for the stage [start, end) on a `device` worker: the memory
    model's peak in that worker's memory where the profile carries the run's training settings
    (`model_profile(..., training=)`), else the profile's own 16 B/param (a synthetic profile)."""
    if profile.model is None or profile.training is None:
        return profile.stage_cost(start, end).train_memory_bytes
    return span_memory(profile.model, start, end, training_shape(profile.training, device, profile.overlap_steps)).device
