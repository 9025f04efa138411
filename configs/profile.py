"""What each piece of a GPT-J costs to train: parameters, FLOPs, memory, traffic. Pure arithmetic.

Conventions: training costs 6 FLOPs per parameter per token (forward 2, backward 4) and
inference 2, counting every parameter, the embedding included; attention's T^2 term is
left out. `train_memory_bytes` is the resident part (weights + gradients + optimizer state,
16 B/param); a stage's whole peak, activations and averaging state included, is
configs/memory.py's, from the run's training settings a profile carries.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import ModelConfig, TrainingConfig

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES_PER_PARAM = 8  # fp32 first and second moments


def bytes_per_element(precision: str) -> int:
    try:
        return BYTES_PER_ELEMENT[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(BYTES_PER_ELEMENT)}") from None


def train_flops_per_token(params: int) -> int:
    return 6 * params


def inference_flops_per_token(params: int) -> int:
    return 2 * params


@dataclass(frozen=True)
class TrainMemory:
    """Bytes that training `params` parameters keeps resident, by kind."""

    weights: int
    gradients: int
    master_weights: int  # fp32 copy the optimizer updates when weights are bf16/fp16; 0 for fp32
    optimizer: int  # Adam m and v

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.master_weights + self.optimizer


def train_memory_breakdown(params: int, precision: str) -> TrainMemory:
    """fp32: 4 + 4 + 0 + 8 = 16 B/param; bf16/fp16: 2 + 2 + 4 + 8 = 16 B/param."""
    b = bytes_per_element(precision)
    master = 0 if precision == "fp32" else 4
    return TrainMemory(
        weights=b * params, gradients=b * params, master_weights=master * params,
        optimizer=ADAM_BYTES_PER_PARAM * params,
    )


def train_memory_bytes(params: int, precision: str) -> int:
    return train_memory_breakdown(params, precision).total


# The residual stream that crosses a stage boundary is fp32 on the wire at every precision: under
# bf16/fp16 autocast the residual adds stay fp32, and worker/pipeline/wire.py sends floats as fp32
# before its codec. Every codec's ratio (configs/compression.py) is defined against these 4 bytes.
WIRE_BYTES_PER_ELEMENT = 4


def activation_bytes_per_token(model: ModelConfig, precision: str) -> int:
    """The raw bytes one token's hidden state takes across a stage boundary, before the codec
    (forward; its gradient is the same size back). The same at every `precision`: see above."""
    bytes_per_element(precision)  # still refuses an unknown precision
    return model.d_model * WIRE_BYTES_PER_ELEMENT


# ----------------------------------------------------------------------------- parameters


def block_params(model: ModelConfig) -> int:
    d, ff = model.d_model, model.inner_dim
    ln_1 = 2 * d
    attn = 4 * d * d  # q, k, v, out; no biases
    mlp = d * ff + ff + ff * d + d  # fc_in, fc_out with biases
    return ln_1 + attn + mlp


def embedding_params(model: ModelConfig) -> int:
    return model.vocab_size * model.d_model  # wte; positions are rotary, not learned


def head_params(model: ModelConfig) -> int:
    ln_f = 2 * model.d_model
    lm_head = model.d_model * model.vocab_size + model.vocab_size  # untied, with bias
    return ln_f + lm_head


def total_params(model: ModelConfig) -> int:
    return embedding_params(model) + model.n_layer * block_params(model) + head_params(model)


# ----------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class LayerCost:
    params: int
    train_flops_per_token: int
    train_memory_bytes: int
    # width of the hidden state entering/leaving this piece; a stage boundary carries this
    activation_bytes_per_token: int

    @property
    def inference_flops_per_token(self) -> int:
        return inference_flops_per_token(self.params)

    def __add__(self, other: LayerCost) -> LayerCost:
        # costs add up; the boundary tensor is as wide as the widest piece's, not a sum
        return LayerCost(
            params=self.params + other.params,
            train_flops_per_token=self.train_flops_per_token + other.train_flops_per_token,
            train_memory_bytes=self.train_memory_bytes + other.train_memory_bytes,
            activation_bytes_per_token=max(self.activation_bytes_per_token, other.activation_bytes_per_token),
        )


def layer_cost(params: int, model: ModelConfig, precision: str) -> LayerCost:
    return LayerCost(
        params=params,
        train_flops_per_token=train_flops_per_token(params),
        train_memory_bytes=train_memory_bytes(params, precision),
        activation_bytes_per_token=activation_bytes_per_token(model, precision),
    )


@dataclass(frozen=True)
class ModelProfile:
    blocks: list[LayerCost]  # one per transformer block, in order
    embedding: LayerCost  # held by the stage that starts at block 0
    head: LayerCost  # ln_f + lm_head, held by the stage that ends at the last block
    # The run's shape and settings, from which configs.memory.stage_peak prices a stage's whole
    # memory; None in a synthetic profile, which is priced by its blocks' train_memory_bytes.
    model: ModelConfig | None = None
    training: TrainingConfig | None = None
    overlap_steps: bool = False  # the compression policy may overlap steps: twice the micro-batches in flight

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    def stage_cost(self, start: int, end: int) -> LayerCost:
        """Cost of a stage holding blocks [start, end), with the embedding/head it would hold."""
        if not 0 <= start < end <= self.n_layer:
            raise ValueError(f"stage [{start}, {end}) is not a non-empty part of [0, {self.n_layer})")
        cost = sum(self.blocks[start + 1 : end], self.blocks[start])
        if start == 0:
            cost = self.embedding + cost
        if end == self.n_layer:
            cost = cost + self.head
        return cost

    @property
    def total(self) -> LayerCost:
        return self.stage_cost(0, self.n_layer)


def model_profile(model: ModelConfig, precision: str, training: TrainingConfig | None = None,
                  overlap_steps: bool = False) -> ModelProfile:
    """The costs of `model`'s pieces; with `training` (whose precision must be `precision`) a
    stage's memory is the memory model's, else the resident 16 B/param alone."""
    if training is not None and training.precision != precision:
        raise ValueError(f"precision {precision!r} differs from the training section's {training.precision!r}")
    block = layer_cost(block_params(model), model, precision)
    return ModelProfile(
        blocks=[block] * model.n_layer,
        embedding=layer_cost(embedding_params(model), model, precision),
        head=layer_cost(head_params(model), model, precision),
        model=model if training is not None else None, training=training, overlap_steps=overlap_steps,
    )
