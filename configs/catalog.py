"""The GPU catalog (configs/gpus.yaml), typed: what planning and cost estimates assume per card.

`load_catalog()` reads and checks the YAML; a bad entry is a `ConfigError` with one line per
problem that names the card and the field. `GpuCatalog.match_device_name()` maps the name
a driver reports ("NVIDIA GeForce RTX 3080 Ti") to its entry.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from configs.loader import ConfigError, format_validation_error, parse_yaml

__all__ = [
    "CATALOG_PATH",
    "PRECISIONS",
    "CatalogError",
    "GpuCatalog",
    "GpuEntry",
    "GpuSpec",
    "PeakFlops",
    "Precision",
    "catalog_from_tree",
    "load_catalog",
]

CATALOG_PATH = Path(__file__).resolve().parent / "gpus.yaml"

Precision = Literal["fp32", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

_PositiveFlops = Annotated[float, Field(gt=0)]
_Alias = Annotated[str, Field(min_length=1)]
_CardId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class PeakFlops(TypedDict):
    """Peak dense FLOP/s by precision; a plain dict at run time, all four keys required."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)  # type: ignore[misc]

    fp32: _PositiveFlops
    tf32: _PositiveFlops
    bf16: _PositiveFlops
    fp16: _PositiveFlops


class GpuEntry(BaseModel):
    """One card's figures as written in gpus.yaml (the id is the entry's key)."""

    # strict: a quoted "24" or a float memory size is rejected, never coerced.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: Literal["datacenter", "consumer"]
    names: list[_Alias] = Field(min_length=1)  # aliases of the driver-reported device name
    memory_bytes: Annotated[int, Field(gt=0)]
    peak_flops: PeakFlops
    board_power_watts: Annotated[float, Field(gt=0)]
    usd_per_hour: Annotated[float, Field(ge=0)]


class GpuSpec(GpuEntry):
    """A catalog card. `peak_flops` maps each of PRECISIONS to dense FLOP/s."""

    id: _CardId

    def peak(self, precision: str) -> float:
        if precision not in PRECISIONS:
            raise CatalogError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
        return self.peak_flops[precision]  # type: ignore[literal-required]


class CatalogError(KeyError):
    """An id or precision the catalog does not have; the message suggests close matches."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return self.message


class GpuCatalog:
    """Cards by id, in file order. Iterating yields `GpuSpec`s."""

    def __init__(self, specs: Iterable[GpuSpec]) -> None:
        self._specs: dict[str, GpuSpec] = {}
        for spec in specs:
            if spec.id in self._specs:
                raise ValueError(f"duplicate GPU id {spec.id!r}")
            self._specs[spec.id] = spec
        # (lowercased alias, spec), longest alias first: the first hit is the best match.
        self._aliases = sorted(
            ((_normalise(name), spec) for spec in self._specs.values() for name in spec.names),
            key=lambda pair: -len(pair[0]),
        )

    @property
    def ids(self) -> list[str]:
        return list(self._specs)

    def get(self, gpu_id: str) -> GpuSpec:
        try:
            return self._specs[gpu_id]
        except KeyError:
            raise CatalogError(f"unknown GPU {gpu_id!r}{self._suggest(gpu_id)}") from None

    def peak_flops(self, gpu_id: str, precision: str) -> float:
        """Peak dense FLOP/s of card `gpu_id` at `precision` (one of PRECISIONS)."""
        return self.get(gpu_id).peak(precision)

    def match_device_name(self, name: str) -> GpuSpec | None:
        """The card whose alias occurs in `name` as a whole word run; the longest alias wins.

        Case-insensitive. "NVIDIA A10" matches "NVIDIA A10" but not "NVIDIA A100-SXM4-40GB"
        or "NVIDIA A10G": an alias must not run on into a letter or digit on either side.
        """
        text = _normalise(name)
        for alias, spec in self._aliases:
            if _occurs_as_word(alias, text):
                return spec
        return None

    def __getitem__(self, gpu_id: str) -> GpuSpec:
        return self.get(gpu_id)

    def __contains__(self, gpu_id: object) -> bool:
        return gpu_id in self._specs

    def __iter__(self) -> Iterator[GpuSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"GpuCatalog({', '.join(self._specs)})"

    def _suggest(self, gpu_id: str) -> str:
        by_lower = {known.lower(): known for known in self._specs}
        close = difflib.get_close_matches(gpu_id.lower(), list(by_lower), n=3, cutoff=0.5)
        if close:
            return "; did you mean " + " or ".join(repr(by_lower[c]) for c in close) + "?"
        return f" (known: {', '.join(self._specs)})"


def _normalise(name: str) -> str:
    return " ".join(name.lower().split())


def _occurs_as_word(alias: str, text: str) -> bool:
    start = text.find(alias)
    while start != -1:
        end = start + len(alias)
        before_ok = start == 0 or not text[start - 1].isalnum()
        after_ok = end == len(text) or not text[end].isalnum()
        if before_ok and after_ok:
            return True
        start = text.find(alias, start + 1)
    return False


_FILE_ADAPTER: TypeAdapter[dict[str, GpuEntry]] = TypeAdapter(dict[_CardId, GpuEntry])


def load_catalog(path: str | Path | None = None) -> GpuCatalog:
    """Read and check a GPU catalog; None reads the packaged configs/gpus.yaml."""
    path = Path(path) if path is not None else CATALOG_PATH
    source = path.name
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    return catalog_from_tree(parse_yaml(text, source), source)


def catalog_from_tree(tree: Any, source: str = "gpus.yaml") -> GpuCatalog:
    """Check a parsed catalog (a mapping of card id to its figures) and build it."""
    if not isinstance(tree, dict) or not tree:
        raise ConfigError([f"{source}: expected a mapping of GPU id to its figures (kind:, names:, ...)"])
    try:
        entries = _FILE_ADAPTER.validate_python(tree, strict=True)
    except ValidationError as err:
        raise ConfigError([f"{source}: {line}" for line in _error_lines(err)]) from None
    specs = [GpuSpec(id=gpu_id, **dict(entry)) for gpu_id, entry in entries.items()]
    problems = [f"{source}: {line}" for line in _alias_clashes(specs)]
    if problems:
        raise ConfigError(problems)
    return GpuCatalog(specs)


def _error_lines(err: ValidationError) -> list[str]:
    """The loader's one-line-per-error format, with a did-you-mean for a misspelt field."""
    lines = format_validation_error(err)
    for i, item in enumerate(err.errors()):
        loc = item["loc"]
        if item["type"] == "extra_forbidden" and len(loc) in (2, 3) and lines[i].endswith("unknown key"):
            fields = list(GpuEntry.model_fields) if len(loc) == 2 else list(PRECISIONS)
            close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
            lines[i] += f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
    return lines


def _alias_clashes(specs: list[GpuSpec]) -> list[str]:
    """An alias listed under two cards would make device-name matching ambiguous."""
    owner: dict[str, str] = {}
    problems = []
    for spec in specs:
        for name in spec.names:
            key = _normalise(name)
            if key in owner and owner[key] != spec.id:
                problems.append(f"{spec.id}.names: {name!r} is also an alias of {owner[key]}")
            owner.setdefault(key, spec.id)
    return problems
