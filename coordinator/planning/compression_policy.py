"""Which compression each worker uses: a pure function of its link, its compute and the policy.

Two kinds of traffic share a worker's link:

* activations (and their gradients) crossing stage boundaries, every micro-batch. The policy
  picks the lightest codec with which the link still carries `link_headroom` x what the
  accelerator computes, and with which the transfers a synchronous pipeline cannot hide (one
  micro-batch in at each step's start, its gradients out at the end) take at most
  `exposed_transfer_budget` of a step: compressing harder would cost accuracy and encoding
  time for no speed. With many micro-batches per step the first rule decides; with few, the
  second.
* averaging rounds among a stage's replicas, every `sync_period` local steps. Each replica
  moves about its stage's parameters x the codec's ratio per round, and a round may take at
  most `sync_budget` of the time those steps compute, on the link time activations leave.
  Frequent averaging keeps replicas close, so the shortest period that fits comes first, and
  for it the lightest codec; but only among dense codecs (fp16, 8-bit). Sparse ones (top-k,
  PowerSGD) drop most of each pseudo-gradient, and averaging with them every step trained
  worse than dense averaging every few steps (a 2x2 tiny swarm: validation 4.78 with top-k 1%
  every step, 2.68 with float16), so they come in only at the longest period, once no dense
  codec fits there. A ladder of sparse codecs alone keeps the plain rule.

Slower links only ever get heavier compression and longer periods (tests check this).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from configs.codecs import SPARSE_CODECS, CodecChoice
from configs.compression import CompressionPolicy
from configs.link import Link
from protos import swarmtrain_pb2 as pb
from protos.codec_spec import to_spec

__all__ = ["WorkerCompression", "choose_compression", "compression_spec", "explain",
           "heaviest_activation_ratio"]


@dataclass(frozen=True)
class WorkerCompression:
    activation: CodecChoice  # for activations and their gradients
    sync: CodecChoice  # for the stage's averaging rounds
    sync_period: int  # local steps between averaging rounds
    activation_ratio: float  # expected compressed / raw bytes of the activation codec
    overlap_steps: bool = False  # stage 0 sends the next step's first microbatch early

    @property
    def activation_codec(self) -> str:
        return self.activation.name

    @property
    def sync_codec(self) -> str:
        return self.sync.name


def heaviest_activation_ratio(policy: CompressionPolicy) -> float:
    """The smallest activation ratio the policy allows: what the planner may assume for a worker."""
    return min(policy.ratio(c) for c in policy.activation_ladder)


def choose_compression(
    policy: CompressionPolicy,
    *,
    link: Link,
    compute_tokens_per_s: float,
    activation_bytes_per_token_sent: float,
    stage_param_bytes: float,
    tokens_per_step: int,
    microbatch_tokens: int,
) -> WorkerCompression:
    """Codecs and averaging period for one worker on one stage.

    link: the worker's link (its slower direction counts). compute_tokens_per_s: what its
    accelerator trains on this stage. activation_bytes_per_token_sent: raw boundary bytes per
    token over all the stage's crossings (0 for a single-stage plan). stage_param_bytes: the
    stage's parameters as fp32 (4 bytes each), what an uncompressed averaging round moves.
    microbatch_tokens: tokens of one micro-batch, the unit that crosses a boundary.
    """
    rate = link.bottleneck_bytes_per_s  # bytes/s
    if rate <= 0 or compute_tokens_per_s <= 0:
        raise ValueError(f"the link and compute_tokens_per_s must be > 0 (got {link.describe()}, "
                         f"{compute_tokens_per_s})")
    if activation_bytes_per_token_sent < 0 or stage_param_bytes < 0 or \
            min(tokens_per_step, microbatch_tokens) <= 0:
        raise ValueError("activation bytes and parameter bytes must be >= 0, tokens_per_step and "
                         "microbatch_tokens > 0")
    wanted = policy.link_headroom * compute_tokens_per_s
    step_s = tokens_per_step / compute_tokens_per_s

    def carries(codec: str) -> bool:  # the bandwidth: the link keeps up with the compute
        return rate / (activation_bytes_per_token_sent * policy.ratio(codec)) >= wanted

    def hides(codec: str) -> bool:  # the latency: a step waits little on its first and last transfer
        exposed_s = 2 * microbatch_tokens * activation_bytes_per_token_sent * policy.ratio(codec) / rate
        return exposed_s <= policy.exposed_transfer_budget * step_s

    # activations: the first codec that meets both; short of that, the ladder's last.
    # The link share they keep: with a codec that meets the headroom, at most 1/headroom of
    # it; reserving that bound rather than what the chosen codec happens to use keeps the rule
    # monotone (a slower link switching to a heavier activation codec must not free bandwidth
    # for averaging). Short of the headroom, they use what they use, up to all.
    ladder = policy.activation_ladder
    if activation_bytes_per_token_sent == 0:
        act_codec, act_share = ladder[0], 0.0  # nothing crosses a boundary: nothing to compress
    else:
        act_codec = next((c for c in ladder if carries(c) and hides(c)), ladder[-1])
        if carries(act_codec):
            act_share = 1 / policy.link_headroom
        else:
            used = compute_tokens_per_s * activation_bytes_per_token_sent * policy.ratio(act_codec)
            act_share = min(1.0, used / rate)
    sync_link = rate * (1 - act_share)  # bytes/s left for averaging

    # averaging: shortest period, then lightest codec, whose round fits the budget
    period, sync_codec = policy.sync_periods[-1], policy.sync_ladder[-1]
    if stage_param_bytes == 0:
        period, sync_codec = policy.sync_periods[0], policy.sync_ladder[0]
    elif sync_link > 0:
        chosen = _first_fit(policy, stage_param_bytes, sync_link, step_s)
        if chosen is not None:
            period, sync_codec = chosen
    return WorkerCompression(
        activation=policy.choice(act_codec),
        sync=policy.choice(sync_codec),
        sync_period=period,
        activation_ratio=policy.ratio(act_codec),
        # where the link cannot carry activations whole, their transfer at each step's start
        # and end is what a thin link costs the pipeline most: hide some of it
        overlap_steps=policy.overlap_steps and activation_bytes_per_token_sent > 0 and act_codec != ladder[0],
    )


def _first_fit(policy: CompressionPolicy, param_bytes: float, sync_link: float,
               step_s: float) -> tuple[int, str] | None:
    def fits(period: int, codec: str) -> bool:
        return param_bytes * policy.ratio(codec) / sync_link <= policy.sync_budget * period * step_s

    dense = [c for c in policy.sync_ladder if c not in SPARSE_CODECS]
    if not dense:
        dense = policy.sync_ladder  # only sparse codecs allowed: the plain rule
    for period in policy.sync_periods:
        for codec in dense:
            if fits(period, codec):
                return period, codec
    longest = policy.sync_periods[-1]
    for codec in policy.sync_ladder:  # dense ones fit nowhere: the sparse ones, at the longest period
        if fits(longest, codec):
            return longest, codec
    return None


def explain(choice: WorkerCompression) -> str:
    """A short phrase for logs and status lines."""
    every = "every step" if choice.sync_period == 1 else f"every {choice.sync_period} steps"
    overlapped = ", steps overlapped" if choice.overlap_steps else ""
    return f"activations {choice.activation_codec}{overlapped}, sync {choice.sync_codec} {every}"


def compression_spec(codec: str, choice: WorkerCompression) -> pb.CompressionSpec:
    """`codec` (choice's activation or sync codec) with its parameters, as an assignment carries it."""
    chosen = next((c for c in (choice.activation, choice.sync) if c.name == codec), None)
    return to_spec(chosen if chosen is not None else replace(choice.sync, name=codec))
