"""Cost model: published FLOP counts, memory per parameter, time/money/energy arithmetic worked
out by hand, and the fleet and datacenter estimates against their closed forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.catalog import GpuCatalog, GpuSpec, load_catalog
from configs.fleet import FleetGroup, fleet_from_tree, load_fleet
from configs.loader import ConfigError, load_config
from configs.memory import ALLOCATOR_SLACK, FRAMEWORK_BYTES, stage_peak, usable_memory
from configs.profile import ModelProfile, model_profile, total_params
from coordinator.costs.model import (
    DEFAULT_MFU,
    achieved_flops,
    energy_kwh,
    estimate_datacenter,
    estimate_swarm,
    inference_flops,
    layers_that_fit,
    run_cost,
    train_flops,
    train_memory,
    train_memory_per_param,
    training_seconds,
)
from coordinator.planning.planner import InfeasiblePlanError

GIB = 2**30
GPTJ_PARAMS = 6_050_882_784  # 28 x 201,355,264 + embedding 206,438,400 + head 206,496,992
GPTJ_BLOCK_PARAMS = 201_355_264
FLEET_DIR = Path(__file__).resolve().parents[2] / "configs" / "fleets"


@pytest.fixture(scope="module")
def gptj() -> ModelProfile:
    return model_profile(load_config("gptj-6b").model, "bf16")


@pytest.fixture(scope="module")
def catalog() -> GpuCatalog:
    return load_catalog()


def card(memory_gib: float = 80, bf16: float = 100e12, watts: float = 500, usd: float = 2.0) -> GpuSpec:
    """A made-up card with round figures, so expected values can be worked out by hand."""
    return GpuSpec(id="TEST", kind="datacenter", names=["Test GPU"], memory_bytes=int(memory_gib * GIB),
                   peak_flops={"fp32": bf16 / 4, "tf32": bf16 / 2, "bf16": bf16, "fp16": bf16},
                   board_power_watts=watts, usd_per_hour=usd)


def group(gpu: GpuSpec, count: int, link_mbps: float = 1000, usd: float | None = None) -> FleetGroup:
    return FleetGroup(gpu, count, link_mbps, gpu.usd_per_hour if usd is None else usd)


def within(value: float, expected: float, rel: float = 0.02) -> bool:
    return abs(value / expected - 1) <= rel


# ----------------------------------------------------------------------------- FLOPs


def test_gpt3_175b_on_300b_tokens_is_3_14e23_flops() -> None:
    # Brown et al. 2020 (GPT-3), table D.1: 3.14e23 training FLOPs for 175B on 300B tokens
    assert within(train_flops(175_000_000_000, 300_000_000_000), 3.14e23)


def test_gptj_6b_on_3_53b_tokens_is_1_28e20_flops(gptj) -> None:
    assert gptj.total.params == GPTJ_PARAMS
    # 6 x 6.0509e9 x 3.53e9 = 1.2816e20
    assert within(train_flops(gptj.total.params, 3_530_000_000), 1.28e20)


@pytest.mark.parametrize("params, tokens", [(1, 1), (856_064, 1_000), (GPTJ_PARAMS, 2048), (175 * 10**9, 10**6)])
def test_inference_is_2_flops_and_training_6_per_parameter_per_token(params: int, tokens: int) -> None:
    assert inference_flops(params, tokens) == 2 * params * tokens
    assert train_flops(params, tokens) == 3 * inference_flops(params, tokens)


# ----------------------------------------------------------------------------- memory


def test_training_memory_is_16_bytes_per_parameter_at_every_precision() -> None:
    assert train_memory_per_param("fp32") == 4 + 4 + 8  # weights, gradients, Adam m and v
    assert train_memory_per_param("bf16") == 2 + 2 + 4 + 8  # + an fp32 master copy
    assert train_memory_per_param("fp16") == 2 + 2 + 4 + 8
    bf16 = train_memory(1000, "bf16")
    assert (bf16.weights, bf16.gradients, bf16.master_weights, bf16.optimizer) == (2000, 2000, 4000, 8000)
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        train_memory_per_param("int8")


def test_gptj_6b_needs_about_97_gb_to_train(gptj) -> None:
    assert gptj.total.train_memory_bytes == 16 * GPTJ_PARAMS
    assert within(gptj.total.train_memory_bytes, 96.8e9, rel=0.001)


def test_layers_that_fit_match_the_division_by_hand(gptj) -> None:
    per_layer = 16 * GPTJ_BLOCK_PARAMS  # 3,221,684,224 B
    embedding = 16 * 50_400 * 4096
    head = 16 * (2 * 4096 + 4096 * 50_400 + 50_400)
    for memory in (10 * GIB, 12 * GIB, 24 * GIB, 48 * GIB, 80 * GIB):
        fit = layers_that_fit(gptj, memory)
        usable = (memory - FRAMEWORK_BYTES["cuda"]) * (1 - ALLOCATOR_SLACK["cuda"])  # the card less its reserve
        assert fit.middle == usable // per_layer
        assert fit.first == (usable - embedding) // per_layer
        assert fit.last == (usable - head) // per_layer
        assert not fit.whole_model
    # an RTX 3090's 24 GiB: 22.9 GiB usable, 7.6 layers alone, so 7
    assert layers_that_fit(gptj, 24 * GIB).middle == 7
    assert layers_that_fit(gptj, 18 * GPTJ_PARAMS).whole_model
    assert layers_that_fit(gptj, per_layer - 1).middle == 0


def test_layers_that_fit_count_a_real_runs_peak() -> None:
    """With the run's training settings a stage's peak (activations of 4 micro-batches of 2048
    tokens, bf16 copies, the optimizer step) sets what a card holds: an RTX 3090 takes 4 GPT-J
    layers, not the 7 that 16 B/param alone would allow, and every count is the longest that fits."""
    config = load_config("gptj-6b")
    profile = model_profile(config.model, "bf16", config.training)
    fit = layers_that_fit(profile, 24 * GIB)
    assert fit.middle == 4
    usable = usable_memory(24 * GIB, "cuda")
    assert stage_peak(profile, 1, 1 + fit.middle, "cuda") <= usable < stage_peak(profile, 1, 2 + fit.middle, "cuda")
    assert stage_peak(profile, 0, fit.first, "cuda") <= usable < stage_peak(profile, 0, fit.first + 1, "cuda")


# ----------------------------------------------------------------------------- time, money, energy


def test_time_money_and_energy_arithmetic() -> None:
    assert achieved_flops(312e12, 0.4) == pytest.approx(124.8e12)
    assert training_seconds(1e18, 1e14) == pytest.approx(1e4)
    assert energy_kwh(1000, 3600) == pytest.approx(1.0)  # 1 kW for an hour
    # 3.6e9 tokens at 1e5 tokens/s = 36,000 s = 10 h on 8 GPUs of 400 W at $1.79/h
    cost = run_cost(3_600_000_000, 1e5, gpus=8, watts=8 * 400, usd_per_hour=8 * 1.79, usd_per_kwh=0.15)
    assert cost.seconds == pytest.approx(36_000)
    assert cost.gpu_hours == pytest.approx(80)
    assert cost.rent_usd == pytest.approx(143.2)  # 80 GPU-hours x $1.79
    assert cost.energy_kwh == pytest.approx(32)  # 3.2 kW x 10 h
    assert cost.energy_usd == pytest.approx(4.8)  # 32 kWh x $0.15


@pytest.mark.parametrize("mfu", [0, -0.1, 1.5])
def test_an_impossible_utilisation_is_refused(mfu: float) -> None:
    with pytest.raises(ValueError, match="mfu must be in"):
        achieved_flops(1e12, mfu)


# ----------------------------------------------------------------------------- datacenter


def test_datacenter_run_by_hand(gptj) -> None:
    # 8 cards x 100 TFLOP/s x 0.5 = 4e14 FLOP/s; 6 x 6,050,882,784 = 3.6305e10 FLOPs/token
    est = estimate_datacenter(gptj, card(), 8, 3_530_000_000, precision="bf16", usd_per_kwh=0.10, mfu=0.5)
    assert est.cost.tokens_per_s == pytest.approx(4e14 / 3.6305296704e10)
    seconds = 6 * GPTJ_PARAMS * 3_530_000_000 / 4e14  # 320,443 s = 89.0 h
    assert est.cost.seconds == pytest.approx(seconds)
    assert est.cost.rent_usd == pytest.approx(seconds / 3600 * 8 * 2.0)
    assert est.cost.energy_kwh == pytest.approx(8 * 500 * seconds / 3.6e6)
    assert est.cost.energy_usd == pytest.approx(0.10 * est.cost.energy_kwh)
    # 96.8 GB of training state does not fit one 80 GiB card: split across the eight
    assert est.sharded and est.memory_per_gpu == pytest.approx(16 * GPTJ_PARAMS / 8)


def test_datacenter_gptj_on_eight_a100_80gb(gptj, catalog) -> None:
    a100 = catalog.get("A100-80GB")
    est = estimate_datacenter(gptj, a100, 8, 3_530_000_000, precision="bf16", usd_per_kwh=0.15)
    flops_per_s = 8 * a100.peak("bf16") * DEFAULT_MFU
    assert est.cost.tokens_per_s == pytest.approx(flops_per_s / (6 * GPTJ_PARAMS))
    assert est.cost.seconds == pytest.approx(1.2816e20 / flops_per_s, rel=1e-3)
    assert est.cost.gpu_hours == pytest.approx(8 * est.cost.seconds / 3600)


def test_datacenter_keeps_a_full_replica_where_one_fits_and_refuses_what_cannot_fit(gptj) -> None:
    tiny = model_profile(load_config("tiny").model, "fp32")
    est = estimate_datacenter(tiny, card(), 4, 10**6, precision="fp32", usd_per_kwh=0.15)
    assert not est.sharded and est.memory_per_gpu == 16 * total_params(load_config("tiny").model)
    with pytest.raises(InfeasiblePlanError, match="use at least 2"):
        estimate_datacenter(gptj, card(memory_gib=80), 1, 10**6, precision="bf16", usd_per_kwh=0.15)
    # 96.8 GB over what a 24 GiB card offers less its CUDA context and slack, 23.3 GB: 4.15 cards
    with pytest.raises(InfeasiblePlanError, match="use at least 5"):
        estimate_datacenter(gptj, card(memory_gib=24), 4, 10**6, precision="bf16", usd_per_kwh=0.15)
    assert estimate_datacenter(gptj, card(memory_gib=24), 5, 10**6, precision="bf16", usd_per_kwh=0.15).sharded


# ----------------------------------------------------------------------------- swarm


def test_one_gpu_holding_the_whole_model_trains_at_its_compute_rate() -> None:
    model = load_config("tiny").model
    profile = model_profile(model, "fp32")
    gpu = card()
    est = estimate_swarm(profile, [group(gpu, 1)], 10**6, precision="fp32", usd_per_kwh=0.15, mfu=0.5)
    assert est.plan.num_stages == 1
    assert est.cost.tokens_per_s == pytest.approx(gpu.peak("fp32") * 0.5 / (6 * total_params(model)))


def test_a_slow_link_bounds_a_two_stage_pipeline(gptj, catalog) -> None:
    # two 80 GiB cards must split GPT-J; each end stage sends 16,384 B/token once over 10 Mbit/s
    # (4096 x 4 B: the residual crosses as fp32 under bf16 autocast, before the codec):
    # 1.25e6 B/s / 16384 B = 76.3 tokens/s, far below what they compute
    est = estimate_swarm(gptj, [group(catalog.get("A100-80GB"), 2, link_mbps=10)], 10**6, precision="bf16",
                         usd_per_kwh=0.15, activation_ratio=1.0)
    assert est.plan.num_stages == 2
    assert est.cost.tokens_per_s == pytest.approx(10e6 / 8 / 16384)
    # compressed activations let the same link carry 4x the tokens
    quarter = estimate_swarm(gptj, [group(catalog.get("A100-80GB"), 2, link_mbps=10)], 10**6,
                             precision="bf16", usd_per_kwh=0.15, activation_ratio=0.25)
    assert quarter.cost.tokens_per_s == pytest.approx(4 * 10e6 / 8 / 16384)


def test_more_gpus_are_never_slower_and_never_beat_their_summed_compute(gptj, catalog) -> None:
    rtx3090 = catalog.get("RTX-3090")
    rates = []
    for n in (5, 8, 16, 32, 64):
        est = estimate_swarm(gptj, [group(rtx3090, n)], 10**9, precision="bf16", usd_per_kwh=0.15)
        compute_bound = n * rtx3090.peak("bf16") * DEFAULT_MFU / (6 * GPTJ_PARAMS)
        assert 0 < est.cost.tokens_per_s <= compute_bound * (1 + 1e-9)
        rates.append(est.cost.tokens_per_s)
    assert rates == sorted(rates), rates
    assert rates[-1] > 8 * rates[0]


def test_swarm_money_and_energy_count_the_gpus_it_uses(gptj, catalog) -> None:
    rtx4090 = catalog.get("RTX-4090")
    donated = estimate_swarm(gptj, [group(rtx4090, 16, usd=0.0)], 10**9, precision="bf16", usd_per_kwh=0.2)
    used = 16 - donated.idle
    hours = donated.cost.seconds / 3600
    assert donated.cost.rent_usd == 0
    assert donated.cost.energy_kwh == pytest.approx(used * rtx4090.board_power_watts * hours / 1000)
    assert donated.cost.energy_usd == pytest.approx(0.2 * donated.cost.energy_kwh)
    rented = estimate_swarm(gptj, [group(rtx4090, 16)], 10**9, precision="bf16", usd_per_kwh=0.2)
    assert rented.cost.rent_usd == pytest.approx(used * rtx4090.usd_per_hour * hours)


def test_a_fleet_too_small_for_the_model_is_refused(gptj, catalog) -> None:
    with pytest.raises(InfeasiblePlanError, match="cannot hold the model"):
        estimate_swarm(gptj, [group(catalog.get("RTX-3060"), 2)], 10**9, precision="bf16", usd_per_kwh=0.15)


# ----------------------------------------------------------------------------- fleet files


def test_the_example_fleet_is_64_consumer_gpus_on_gigabit_links(catalog) -> None:
    fleet = load_fleet(FLEET_DIR / "consumer-64.yaml", catalog)
    assert sum(g.count for g in fleet) == 64
    assert {g.gpu.kind for g in fleet} == {"consumer"}
    assert {g.link_mbps for g in fleet} == {1000}
    assert len({g.gpu.id for g in fleet}) >= 4
    assert all(g.usd_per_hour == g.gpu.usd_per_hour for g in fleet)


def test_a_fleet_entry_may_declare_its_own_price(catalog) -> None:
    [g] = fleet_from_tree([{"gpu": "RTX-3090", "count": 3, "link_mbps": 100, "usd_per_hour": 0.05}], catalog)
    assert (g.gpu.id, g.count, g.link_mbps, g.usd_per_hour) == ("RTX-3090", 3, 100.0, 0.05)


@pytest.mark.parametrize("tree, problem", [
    ([{"gpu": "RTX-5090", "count": 1, "link_mbps": 1000}],
     "f.yaml: entry 1 (RTX-5090): gpu: unknown GPU 'RTX-5090'; did you mean"),
    ([{"gpu": "RTX-3090", "count": 1, "link_mbps": 1000}, {"gpu": "RTX-3090", "link_mbps": 1000}],
     "f.yaml: entry 2 (RTX-3090): count: required but not set"),
    ([{"gpu": "RTX-3090", "count": "4", "link_mbps": 1000}],
     "f.yaml: entry 1 (RTX-3090): count: input should be a valid integer (got '4')"),
    ([{"gpu": "RTX-3090", "count": 4, "link_mbps": 0}],
     "f.yaml: entry 1 (RTX-3090): link_mbps: input should be greater than 0 (got 0)"),
    ([{"gpu": "RTX-3090", "count": 4, "link_mbps": 10, "usd_per_hour": -1}],
     "f.yaml: entry 1 (RTX-3090): usd_per_hour: input should be greater than or equal to 0 (got -1)"),
    (["RTX-3090"], "f.yaml: entry 1: expected a mapping with gpu, count and link_mbps (got 'RTX-3090')"),
    ({"gpu": "RTX-3090"}, "f.yaml: expected a non-empty list of entries"),
    ([], "f.yaml: expected a non-empty list of entries"),
])
def test_a_bad_fleet_entry_is_named_in_one_line(catalog, tree, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        fleet_from_tree(tree, catalog, "f.yaml")
    [line] = err.value.problems
    assert line.startswith(problem)


def test_a_misspelt_fleet_key_gets_a_suggestion(catalog) -> None:
    with pytest.raises(ConfigError) as err:
        fleet_from_tree([{"gpu": "RTX-3090", "count": 1, "link_mpbs": 1000}], catalog, "f.yaml")
    assert "f.yaml: entry 1 (RTX-3090): link_mpbs: unknown key; did you mean 'link_mbps'?" in err.value.problems
