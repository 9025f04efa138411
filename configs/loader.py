"""Load a RunConfig from YAML plus `--set section.key=value` overrides, with one-line errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from configs.schema import ConfigRuleError, RunConfig

PRESET_DIR = Path(__file__).resolve().parent


class ConfigError(Exception):
    """A config the user must fix. `str(err)` is one line per problem, ready to print."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` as a float, as YAML 1.2 does (PyYAML reads a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{source}:{where}: not valid YAML: {problem}"]) from None


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or a preset name such as `tiny` or `gptj-6b`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and preset.is_file():
        return preset
    presets = ", ".join(list_presets())
    raise ConfigError([f"{name_or_path}: no such config file (presets: {presets})"])


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem != "gpus")


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply `a.b=value` to a nested dict; the value is parsed as YAML (`3`, `true`, `[1, 2]`)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set {assignment!r}: expected section.key=value, e.g. training.batch_size=32"])
    node = tree
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"--set {key}: {'.'.join(parts[: depth + 1])} is a value, not a section"])
        node = child
    node[parts[-1]] = parse_yaml(raw, f"--set {key}") if raw.strip() else ""


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    path = resolve_config_path(name_or_path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    tree = parse_yaml(text, str(path))
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError([f"{path}: expected a mapping of sections (model:, training:, ...)"])
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate_tree(tree, name_or_path)


def validate_tree(tree: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError([f"{source}: {line}" for line in format_validation_error(err)]) from None


def format_validation_error(err: ValidationError) -> list[str]:
    """One line per error: `dotted.key: what is wrong (got X)`."""
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigRuleError):
            # A cross-field rule: its key is relative to the section that raised it.
            key = cause.key if "." in cause.key else ".".join([*loc, cause.key])
            lines.append(f"{key}: {cause.rule}")
            continue
        key = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key{_did_you_mean(loc)}")
        elif item["type"] == "missing":
            lines.append(f"{key}: required but not set")
        else:
            got = item.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{key}: {_lower_first(item['msg'])}{shown}")
    return lines


def _did_you_mean(loc: list[str]) -> str:
    """Suggest the closest valid key for a typo, e.g. `n_layers` -> `n_layer`."""
    import difflib

    fields: dict[str, Any] = RunConfig.model_fields
    for part in loc[:-1]:
        info = fields.get(part)
        annotation = getattr(info, "annotation", None)
        if info is None or not hasattr(annotation, "model_fields"):
            return ""
        fields = annotation.model_fields
    close = difflib.get_close_matches(loc[-1], list(fields), n=1)
    valid = ", ".join(fields)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {valid}"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
