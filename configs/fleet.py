"""A fleet file (configs/fleets/*.yaml), typed: which catalog GPUs, how many, on what links, at what price.

`coordinator plan --fleet FILE` reads one to estimate what a swarm of those GPUs would train.
The file is a YAML list; each entry names a card of configs/gpus.yaml:

    - gpu: RTX-3090        # catalog id
      count: 16            # how many such GPUs
      link_mbps: 1000      # each one's link, Mbit/s (the slower direction)
      usd_per_hour: 0.18   # optional: what one GPU-hour costs its owner; default the catalog's

`load_fleet()` checks it strictly, like a run config: an unknown key, a wrong type, a
non-positive count or an unknown GPU id is a `ConfigError` with one line per problem that
names the entry and the field.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from configs.catalog import CatalogError, GpuCatalog, GpuSpec
from configs.loader import ConfigError, parse_yaml

__all__ = ["FleetEntry", "FleetGroup", "fleet_from_tree", "load_fleet"]


class FleetEntry(BaseModel):
    """One line of a fleet file as written."""

    # strict: a quoted "16" is rejected, never coerced (ints are fine where a float is asked).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    gpu: str = Field(min_length=1)  # id of a card in configs/gpus.yaml
    count: Annotated[int, Field(gt=0)]
    link_mbps: Annotated[float, Field(gt=0)]  # per GPU; the planner uses it for both directions
    usd_per_hour: Annotated[float, Field(ge=0)] | None = None  # None = the catalog's rental price


@dataclass(frozen=True)
class FleetGroup:
    """`count` identical GPUs, their catalog figures resolved."""

    gpu: GpuSpec
    count: int
    link_mbps: float
    usd_per_hour: float  # per GPU: the entry's own price, else the catalog's


def load_fleet(path: str | Path, catalog: GpuCatalog) -> list[FleetGroup]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    return fleet_from_tree(parse_yaml(text, str(path)), catalog, str(path))


def fleet_from_tree(tree: Any, catalog: GpuCatalog, source: str = "fleet") -> list[FleetGroup]:
    """Check a parsed fleet file (a list of entries) and resolve its GPUs in `catalog`."""
    if not isinstance(tree, list) or not tree:
        example = "'- {gpu: RTX-3090, count: 8, link_mbps: 1000}'"
        raise ConfigError([f"{source}: expected a non-empty list of entries such as {example}"])
    groups: list[FleetGroup] = []
    problems: list[str] = []
    for i, item in enumerate(tree):
        where = f"{source}: entry {i + 1}"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping with gpu, count and link_mbps (got {item!r})")
            continue
        if isinstance(item.get("gpu"), str):
            where += f" ({item['gpu']})"
        try:
            entry = FleetEntry.model_validate(item)
        except ValidationError as err:
            problems.extend(f"{where}: {line}" for line in _error_lines(err))
            continue
        try:
            spec = catalog.get(entry.gpu)
        except CatalogError as err:
            problems.append(f"{where}: gpu: {err}")
            continue
        price = entry.usd_per_hour if entry.usd_per_hour is not None else spec.usd_per_hour
        groups.append(FleetGroup(spec, entry.count, entry.link_mbps, price))
    if problems:
        raise ConfigError(problems)
    return groups


def _error_lines(err: ValidationError) -> list[str]:
    """`field: what is wrong (got X)`, with a did-you-mean for a misspelt key."""
    fields = list(FleetEntry.model_fields)
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(entry)"
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            lines.append(f"{key}: unknown key{hint}")
        elif item["type"] == "missing":
            lines.append(f"{key}: required but not set")
        else:
            msg = item["msg"][:1].lower() + item["msg"][1:]
            lines.append(f"{key}: {msg} (got {item.get('input')!r})")
    return lines
