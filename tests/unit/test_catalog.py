"""The GPU catalog: the packaged figures load, are mutually plausible, cite sources, and a
bad catalog is one clear line per problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from configs.catalog import (
    CATALOG_PATH,
    PRECISIONS,
    CatalogError,
    GpuCatalog,
    GpuSpec,
    load_catalog,
)
from configs.loader import ConfigError

GIB = 2**30
REQUIRED_IDS = {
    "H100-SXM", "H100-PCIe", "A100-80GB", "A100-40GB", "A10", "L4", "T4",
    "V100-32GB", "V100-16GB", "RTX-4090", "RTX-3090", "RTX-3080-Ti", "RTX-3080",
}

GOOD_ENTRY = """\
RTX-4090:
  kind: consumer
  names: ["GeForce RTX 4090"]
  memory_bytes: {memory}
  peak_flops: {{fp32: 82.6e12, tf32: 82.6e12, bf16: 165.2e12, fp16: 165.2e12}}
  board_power_watts: 450
  usd_per_hour: 0.40
"""


@pytest.fixture(scope="module")
def catalog() -> GpuCatalog:
    return load_catalog()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gpus.yaml"
    path.write_text(text)
    return path


def test_packaged_catalog_loads_with_the_common_cards(catalog: GpuCatalog) -> None:
    assert REQUIRED_IDS <= set(catalog.ids)
    assert load_catalog(CATALOG_PATH).ids == catalog.ids
    for spec in catalog:
        assert isinstance(spec, GpuSpec)
        assert set(spec.peak_flops) == set(PRECISIONS)
        assert spec.kind in ("datacenter", "consumer")
    assert catalog.get("RTX-4090").kind == "consumer"
    assert catalog.get("A100-80GB").kind == "datacenter"


def test_figures_are_mutually_plausible(catalog: GpuCatalog) -> None:
    flops = catalog.peak_flops
    assert flops("H100-SXM", "bf16") > flops("A100-80GB", "bf16") > flops("V100-32GB", "fp16")
    assert flops("V100-16GB", "fp16") > flops("T4", "fp16")
    assert flops("H100-SXM", "bf16") > flops("H100-PCIe", "bf16")
    assert flops("RTX-4090", "bf16") > flops("RTX-3090", "bf16") > flops("RTX-3080-Ti", "bf16")
    assert flops("RTX-3080-Ti", "bf16") > flops("RTX-3080", "bf16")
    assert catalog.get("A100-80GB").memory_bytes > catalog.get("A100-40GB").memory_bytes
    assert catalog.get("A100-80GB").memory_bytes == 80 * GIB
    assert catalog.get("RTX-4090").memory_bytes == 24 * GIB
    for spec in catalog:
        assert spec.peak_flops["bf16"] >= spec.peak_flops["fp32"], spec.id
        assert spec.peak_flops["tf32"] >= spec.peak_flops["fp32"], spec.id
        # Whole GiB of memory, and peaks between 1 TFLOP/s and 10 PFLOP/s: catches a unit slip.
        assert spec.memory_bytes % GIB == 0, spec.id
        assert all(1e12 <= value <= 1e16 for value in spec.peak_flops.values()), spec.id
        assert 50 <= spec.board_power_watts <= 1000, spec.id
        assert 0 < spec.usd_per_hour < 20, spec.id
    # "Two 3080 Ti draw ~700 W where one A100 draws 300-400 W."
    assert 2 * catalog.get("RTX-3080-Ti").board_power_watts == pytest.approx(700, abs=50)
    for a100 in ("A100-80GB", "A100-40GB"):
        assert 250 <= catalog.get(a100).board_power_watts <= 400
    # Consumer marketplace rentals are cheaper than datacenter on-demand for a similar card.
    assert catalog.get("RTX-4090").usd_per_hour < catalog.get("L40S").usd_per_hour


@pytest.mark.parametrize(
    ("device_name", "expected"),
    [
        ("NVIDIA GeForce RTX 3080 Ti", "RTX-3080-Ti"),
        ("NVIDIA GeForce RTX 3080", "RTX-3080"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("nvidia geforce rtx 3090", "RTX-3090"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-16GB", "V100-16GB"),
        ("Tesla V100-SXM2-32GB", "V100-32GB"),
    ],
)
def test_device_names_match_the_longest_alias(catalog: GpuCatalog, device_name: str, expected: str) -> None:
    spec = catalog.match_device_name(device_name)
    assert spec is not None and spec.id == expected


@pytest.mark.parametrize("device_name", ["AMD Instinct MI250X", "NVIDIA A10G", "cpu", ""])
def test_unknown_device_names_match_nothing(catalog: GpuCatalog, device_name: str) -> None:
    # "NVIDIA A10G" contains "NVIDIA A10" but is another card: aliases match whole words only.
    assert catalog.match_device_name(device_name) is None


def test_unknown_id_and_precision_suggest_close_matches(catalog: GpuCatalog) -> None:
    with pytest.raises(CatalogError, match="A100-80GB") as info:
        catalog.get("A100-80G")
    assert isinstance(info.value, KeyError)
    assert "\n" not in str(info.value)
    with pytest.raises(CatalogError, match="fp32"):
        catalog.peak_flops("T4", "fp8")
    assert catalog.peak_flops("A100-80GB", "bf16") == 312e12


def test_a_valid_custom_catalog_loads(tmp_path: Path) -> None:
    custom = load_catalog(_write(tmp_path, GOOD_ENTRY.format(memory="25_769_803_776")))
    assert custom.ids == ["RTX-4090"]
    assert custom.get("RTX-4090").memory_bytes == 24 * GIB
    assert custom.peak_flops("RTX-4090", "fp16") == 165.2e12


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD_ENTRY.format(memory="-1"),
            "gpus.yaml: RTX-4090.memory_bytes: input should be greater than 0 (got -1)",
        ),
        (
            GOOD_ENTRY.format(memory="24e9"),  # a float, not an integer count of bytes
            "gpus.yaml: RTX-4090.memory_bytes: input should be a valid integer (got 24000000000.0)",
        ),
        (
            GOOD_ENTRY.format(memory='"24GiB"'),
            "gpus.yaml: RTX-4090.memory_bytes: input should be a valid integer (got '24GiB')",
        ),
        (
            # a misspelt field is two problems: the real one is missing, the typo is unknown
            GOOD_ENTRY.format(memory="1").replace("board_power_watts", "board_power_wats"),
            "gpus.yaml: RTX-4090.board_power_watts: required but not set\n"
            "gpus.yaml: RTX-4090.board_power_wats: unknown key; did you mean 'board_power_watts'?",
        ),
        (
            GOOD_ENTRY.format(memory="1").replace("tf32: 82.6e12, ", ""),
            "gpus.yaml: RTX-4090.peak_flops.tf32: required but not set",
        ),
        (
            GOOD_ENTRY.format(memory="1").replace("consumer", "gaming"),
            "gpus.yaml: RTX-4090.kind: input should be 'datacenter' or 'consumer' (got 'gaming')",
        ),
    ],
)
def test_a_bad_catalog_is_one_line_per_problem_naming_card_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_catalog(_write(tmp_path, text))
    assert str(info.value) == expected


def test_catalog_problems_are_reported_together(tmp_path: Path) -> None:
    text = GOOD_ENTRY.format(memory="-1") + GOOD_ENTRY.format(memory="1").replace(
        "RTX-4090:", "RTX-4090-B:"
    ).replace("0.40", "-2")
    with pytest.raises(ConfigError) as info:
        load_catalog(_write(tmp_path, text))
    assert info.value.problems == [
        "gpus.yaml: RTX-4090.memory_bytes: input should be greater than 0 (got -1)",
        "gpus.yaml: RTX-4090-B.usd_per_hour: input should be greater than or equal to 0 (got -2)",
    ]


def test_an_alias_shared_by_two_cards_is_rejected(tmp_path: Path) -> None:
    text = GOOD_ENTRY.format(memory="1") + GOOD_ENTRY.format(memory="1").replace("RTX-4090:", "Other:")
    with pytest.raises(ConfigError) as info:
        load_catalog(_write(tmp_path, text))
    assert str(info.value) == "gpus.yaml: Other.names: 'GeForce RTX 4090' is also an alias of RTX-4090"


def test_unparsable_or_empty_catalog_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^gpus.yaml: line \d+, column \d+: not valid YAML"):
        load_catalog(_write(tmp_path, "RTX-4090: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping of GPU id"):
        load_catalog(_write(tmp_path, ""))
    with pytest.raises(ConfigError, match="cannot read"):
        load_catalog(tmp_path / "missing.yaml")


NUMERIC_KEY = re.compile(
    r"^\s*(memory_bytes|peak_flops|fp32|tf32|bf16|fp16|board_power_watts|usd_per_hour)\s*:"
)


def test_every_figure_in_gpus_yaml_cites_a_source() -> None:
    lines = CATALOG_PATH.read_text().splitlines()
    checked = 0
    for number, line in enumerate(lines):
        if not NUMERIC_KEY.match(line):
            continue
        checked += 1
        above = lines[number - 1] if number else ""
        cited = "#" in line or above.lstrip().startswith("#")
        assert cited, f"gpus.yaml line {number + 1} has no source comment: {line!r}"
    # 17 cards x (memory, peak_flops, 4 precisions, power, price) at the time of writing.
    assert checked >= 8 * len(REQUIRED_IDS)
