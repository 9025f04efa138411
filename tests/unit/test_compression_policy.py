"""Compression policy: the table validates strictly, and the per-worker choice follows the link."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from configs.codecs import CodecChoice
from configs.compression import CODECS, SPARSE_CODECS, CompressionPolicy, blockwise_ratio, topk_ratio
from configs.link import Link
from configs.loader import ConfigError, load_config
from configs.profile import model_profile
from configs.schema import CoordinatorConfig
from coordinator.planning.compression_policy import (
    WorkerCompression,
    choose_compression,
    compression_spec,
    explain,
    heaviest_activation_ratio,
)
from protos import swarmtrain_pb2 as pb
from protos.codec_spec import from_spec


def both(bps: float) -> Link:
    """The same rate each way, in bits/s."""
    return Link.from_bits_per_s(bps, bps)


POLICY = CompressionPolicy()


@pytest.fixture(scope="module")
def middle_stage() -> dict[str, float]:
    """A middle stage of GPT-J 6B (7 of its 28 layers) on a modest GPU (~28 TFLOP/s achieved)."""
    config = load_config("gptj-6b")
    cost = model_profile(config.model, config.training.precision).stage_cost(7, 14)
    return {
        "compute_tokens_per_s": 28e12 / cost.train_flops_per_token,
        "activation_bytes_per_token_sent": 2.0 * cost.activation_bytes_per_token,  # forward and back
        "stage_param_bytes": 4.0 * cost.params,
        "tokens_per_step": config.training.tokens_per_step,
        "microbatch_tokens": config.training.tokens_per_microbatch,
    }


# ----------------------------------------------------------------------------- the table


def test_codec_names_are_the_proto_enum() -> None:
    from_proto = [n.removeprefix("CODEC_").lower() for n in pb.Codec.keys() if n != "CODEC_UNSPECIFIED"]
    assert list(CODECS) == from_proto


def test_default_ratios_follow_the_codec_parameters() -> None:
    r = POLICY.ratios
    assert r["none"] == 1.0 and r["float16"] == r["bfloat16"] == 0.5
    assert r["blockwise_8bit"] == (8 * 64 + 32) / (32 * 64) == 0.265625  # one fp32 scale per 64 values
    assert r["blockwise_4bit"] == (4 * 64 + 32) / (32 * 64) == 0.140625
    assert r["topk_4bit"] == pytest.approx(0.01 * 36 / 32)  # 1% kept, 4-bit value + 32-bit index each
    assert 0 < r["powersgd"] < 0.1
    wider = CompressionPolicy(block_size=256, topk_fraction=0.05)
    assert wider.ratios["blockwise_8bit"] == blockwise_ratio(8, 256) < r["blockwise_8bit"]
    assert wider.ratios["topk_4bit"] == topk_ratio(0.05)


def test_ratio_overrides_merge_with_the_derived_ones() -> None:
    policy = CompressionPolicy(ratios={"topk_4bit": 0.02})
    assert policy.ratios["topk_4bit"] == 0.02
    assert policy.ratios["blockwise_8bit"] == POLICY.ratios["blockwise_8bit"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"activation_ladder": ["none", "int8"]}, "unknown codec 'int8'; valid: none, float16, bfloat16"),
        ({"ratios": {"fp8": 0.3}}, "unknown codec 'fp8'"),
        ({"sync_ladder": []}, "at least 1 item"),
        ({"ratios": {"float16": 1.5}}, "less than or equal to 1"),
        ({"ratios": {"float16": 0.0}}, "greater than 0"),
        ({"sync_periods": [1, 16, 4]}, "must increase strictly"),
        ({"sync_periods": [0, 4]}, "greater than 0"),
        ({"activation_ladder": ["blockwise_8bit", "none"]}, "lightest compression to the heaviest"),
        ({"activation_ladder": ["none", "topk_4bit"]}, "activation_ladder: topk_4bit cannot carry activation"),
        ({"sync_ladder": ["float16", "float16"]}, "lists a codec twice"),
        ({"link_headroom": 1.0}, "greater than 1"),
        ({"sync_budget": 0}, "greater than 0"),
        ({"exposed_transfer_budget": 0}, "greater than 0"),
        ({"exposed_transfer_budget": 1.5}, "less than or equal to 1"),
        ({"block_size": "64"}, "valid integer"),
        ({"blocksize": 64}, "extra"),
    ],
)
def test_bad_policies_are_rejected(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CompressionPolicy(**fields)


def test_policy_lives_in_the_coordinator_config() -> None:
    assert CoordinatorConfig().compression == CompressionPolicy()
    config = load_config("tiny", ["coordinator.compression.sync_budget=0.2",
                                  "coordinator.compression.ratios.topk_4bit=0.02"])
    assert config.coordinator.compression.sync_budget == 0.2
    assert config.coordinator.compression.ratios["topk_4bit"] == 0.02
    with pytest.raises(ConfigError, match=r"compression\.sync_ladder\.0: .*unknown codec 'zstd'"):
        load_config("tiny", ["coordinator.compression.sync_ladder=[zstd]"])
    with pytest.raises(ConfigError, match=r"coordinator\.compression\.sync_periods: must increase strictly"):
        load_config("tiny", ["coordinator.compression.sync_periods=[4, 1]"])
    with pytest.raises(ConfigError) as err:  # refused, not carried as another codec
        load_config("tiny", ["coordinator.compression.activation_ladder=[none, powersgd]"])
    assert err.value.problems == [
        "tiny: coordinator.compression.activation_ladder: powersgd cannot carry activations (they drop most "
        "of each tensor); valid: none, float16, bfloat16, blockwise_8bit, blockwise_4bit"]


# ----------------------------------------------------------------------------- the choice


def test_a_fast_link_barely_compresses(middle_stage: dict[str, float]) -> None:
    for link in (1e9, 2.5e9, 10e9):
        choice = choose_compression(POLICY, link=both(link), **middle_stage)
        assert choice.activation_codec in ("none", "float16")
        assert choice.sync_codec not in SPARSE_CODECS and choice.sync_period <= 4, choice
    fastest = choose_compression(POLICY, link=both(10e9), **middle_stage)
    # 8-bit even here: rounds are spaced by their bytes, and error feedback keeps what 8-bit rounds off
    assert (fastest.sync_period, fastest.sync_codec) == (1, "blockwise_8bit")


def test_a_slow_link_compresses_hard_and_averages_rarely(middle_stage: dict[str, float]) -> None:
    choice = choose_compression(POLICY, link=both(20e6), **middle_stage)
    assert choice.activation_codec in ("blockwise_8bit", "blockwise_4bit")
    assert choice.sync_period >= 16
    assert choice.sync_codec in ("topk_4bit", "blockwise_8bit")
    assert choice.activation_ratio == POLICY.ratios[choice.activation_codec]


def test_dense_averaging_every_few_steps_comes_before_sparse_averaging_every_step(
    middle_stage: dict[str, float],
) -> None:
    # find the link where 8-bit every step just fails to fit: the old rule chose top-k every step there
    links = [10e9 / 1.2**i for i in range(120)]
    choices = [(link, choose_compression(POLICY, link=both(link), **middle_stage)) for link in links]
    periods_with_sparse = {c.sync_period for _, c in choices if c.sync_codec in SPARSE_CODECS}
    assert periods_with_sparse <= {POLICY.sync_periods[-1]}, periods_with_sparse
    dense_periods = [c.sync_period for _, c in choices if c.sync_codec not in SPARSE_CODECS]
    assert len(set(dense_periods)) >= 3  # the period grows with dense codecs before any sparse one
    sparse_only = CompressionPolicy(sync_ladder=["topk_4bit", "powersgd"])
    fast = choose_compression(sparse_only, link=both(10e9), **middle_stage)
    assert fast.sync_period == 1  # a ladder of sparse codecs alone keeps the plain rule


def test_in_between_a_link_gets_in_between(middle_stage: dict[str, float]) -> None:
    fast = choose_compression(POLICY, link=both(1e9), **middle_stage)
    mid = choose_compression(POLICY, link=both(100e6), **middle_stage)
    slow = choose_compression(POLICY, link=both(20e6), **middle_stage)
    assert fast.activation_ratio > mid.activation_ratio >= slow.activation_ratio
    assert fast.sync_period <= mid.sync_period <= slow.sync_period


def _small_stage_zero(micro_batches: int) -> dict[str, float]:
    """Stage 0 of the small preset (layers 0-1) at 40 GFLOP/s, a CPU worker; steps of 16 x 128 tokens."""
    config = load_config("small")
    cost = model_profile(config.model, config.training.precision).stage_cost(0, 2)
    return {"compute_tokens_per_s": 40e9 / cost.train_flops_per_token,
            "activation_bytes_per_token_sent": float(cost.activation_bytes_per_token),
            "stage_param_bytes": 4.0 * cost.params, "tokens_per_step": 2048,
            "microbatch_tokens": 2048 // micro_batches}


def test_few_micro_batches_per_step_compress_for_the_transfer_a_step_waits_on() -> None:
    two = _small_stage_zero(micro_batches=2)
    bandwidth_only = CompressionPolicy(exposed_transfer_budget=1.0)
    # the bandwidth alone is carried with 8-bit activations at 20 Mbit/s...
    assert choose_compression(bandwidth_only, link=both(20e6), **two).activation_codec == "blockwise_8bit"
    # ...but one micro-batch of 8-bit activations out and its gradients back take 0.22 s of a 0.5-s step
    choice = choose_compression(POLICY, link=both(20e6), **two)
    assert choice.activation_codec == "blockwise_4bit"
    # with many micro-batches per step, each crossing is short and bandwidth decides again
    many = _small_stage_zero(micro_batches=64)
    assert choose_compression(POLICY, link=both(20e6), **many).activation_codec == "blockwise_8bit"
    # a fast link hides even whole activations
    assert choose_compression(POLICY, link=both(10e9), **two).activation_codec == "none"


def test_a_single_stage_sends_no_activations(middle_stage: dict[str, float]) -> None:
    alone = {**middle_stage, "activation_bytes_per_token_sent": 0.0}
    choice = choose_compression(POLICY, link=both(1e6), **alone)
    assert choice.activation_codec == POLICY.activation_ladder[0]


def test_steps_overlap_only_where_the_link_needs_activation_compression(middle_stage: dict[str, float]) -> None:
    assert not choose_compression(POLICY, link=both(20e6), **middle_stage).overlap_steps  # off by default
    allowed = CompressionPolicy(overlap_steps=True)
    assert not choose_compression(allowed, link=both(10e9), **middle_stage).overlap_steps  # whole activations
    slow = choose_compression(allowed, link=both(20e6), **middle_stage)
    assert slow.overlap_steps and slow.activation_codec != allowed.activation_ladder[0]
    alone = {**middle_stage, "activation_bytes_per_token_sent": 0.0}
    assert not choose_compression(allowed, link=both(1e6), **alone).overlap_steps  # nothing to overlap


def test_codec_parameters_come_from_the_policy(middle_stage: dict[str, float]) -> None:
    policy = CompressionPolicy(block_size=128, topk_fraction=0.02, powersgd_rank=8)
    choice = choose_compression(policy, link=both(1e8), **middle_stage)
    assert choice.sync == CodecChoice(choice.sync_codec, 128, 0.02, 8)
    assert choice.activation == CodecChoice(choice.activation_codec, 128, 0.02, 8)
    for codec in (choice.activation_codec, choice.sync_codec):  # what the assignment carries
        assert from_spec(compression_spec(codec, choice)) == CodecChoice(codec, 128, 0.02, 8)


def test_the_slower_direction_of_the_link_decides(middle_stage: dict[str, float]) -> None:
    thin_up = Link.from_mbps(20, 1000)
    assert choose_compression(POLICY, link=thin_up, **middle_stage) == \
        choose_compression(POLICY, link=both(20e6), **middle_stage) == \
        choose_compression(POLICY, link=Link.from_mbps(1000, 20), **middle_stage)


def test_heaviest_activation_ratio_is_the_ladders_last() -> None:
    assert heaviest_activation_ratio(POLICY) == POLICY.ratios["blockwise_4bit"]
    assert heaviest_activation_ratio(CompressionPolicy(activation_ladder=["none"])) == 1.0


def test_explain() -> None:
    choice = WorkerCompression(CodecChoice("blockwise_8bit"), CodecChoice("topk_4bit"), 64, 0.265625)
    assert explain(choice) == "activations blockwise_8bit, sync topk_4bit every 64 steps"
    assert explain(WorkerCompression(CodecChoice("none"), CodecChoice("float16"), 1, 1.0)) == \
        "activations none, sync float16 every step"
    overlapped = WorkerCompression(CodecChoice("blockwise_4bit"), CodecChoice("float16"), 256, 0.140625,
                                   overlap_steps=True)
    assert explain(overlapped) == "activations blockwise_4bit, steps overlapped, sync float16 every 256 steps"


def test_nonsense_inputs_are_rejected(middle_stage: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="the link"):
        choose_compression(POLICY, link=both(0), **middle_stage)
    with pytest.raises(ValueError, match="the link"):
        choose_compression(POLICY, link=Link.from_mbps(0, 10), **middle_stage)
    with pytest.raises(ValueError, match="microbatch_tokens"):
        choose_compression(POLICY, link=both(1e9), **{**middle_stage, "microbatch_tokens": 0})


# ----------------------------------------------------------------------------- monotone


def _rank(policy: CompressionPolicy, choice: WorkerCompression) -> tuple[float, int, float]:
    """(activation ratio, period, sync bytes per local step): each must not rise as the link slows."""
    per_step = policy.ratios[choice.sync_codec] / choice.sync_period
    return (choice.activation_ratio, choice.sync_period, per_step)


@settings(max_examples=150, deadline=None)
@given(
    compute=st.floats(10.0, 1e6),
    act_bytes=st.sampled_from([0.0, 2048.0, 8192.0, 16384.0, 32768.0]),
    params=st.floats(1e6, 1e11),
    tokens_per_step=st.integers(1_000, 4_000_000),
    headroom=st.floats(1.01, 4.0),
    budget=st.floats(0.01, 1.0),
    exposed=st.floats(0.01, 1.0),
    micro_batches=st.integers(1, 64),
    ladders=st.sampled_from([
        (["none", "float16", "blockwise_8bit", "blockwise_4bit"], ["float16", "blockwise_8bit", "topk_4bit"]),
        (["float16", "blockwise_4bit"], ["float16", "blockwise_8bit"]),
        (["none"], ["blockwise_8bit", "powersgd"]),
    ]),
    start=st.floats(1e9, 1e12),
    step=st.floats(1.01, 1.5),
)
def test_a_slower_link_never_gets_lighter_compression_or_a_shorter_period(
    compute: float, act_bytes: float, params: float, tokens_per_step: int, headroom: float, budget: float,
    exposed: float, micro_batches: int, ladders: tuple[list[str], list[str]], start: float, step: float,
) -> None:
    policy = CompressionPolicy(activation_ladder=ladders[0], sync_ladder=ladders[1], link_headroom=headroom,
                               sync_budget=budget, exposed_transfer_budget=exposed)
    common = dict(compute_tokens_per_s=compute, activation_bytes_per_token_sent=act_bytes,
                  stage_param_bytes=params, tokens_per_step=tokens_per_step,
                  microbatch_tokens=max(1, tokens_per_step // micro_batches))
    # walk the link down from `start` in small steps, past every threshold on the way
    link, previous = start, None
    while link > 1e4:
        current = _rank(policy, choose_compression(policy, link=both(link), **common))
        if previous is not None:
            assert current[0] <= previous[0], f"{link:.4g} bit/s got a lighter activation codec"
            assert current[1] >= previous[1], f"{link:.4g} bit/s got a shorter averaging period"
            assert current[2] <= previous[2] * (1 + 1e-12), f"{link:.4g} bit/s averages more bytes per step"
        previous = current
        link /= step
