"""The error a config rule that spans fields raises: its own module, so every config module can
raise it without importing the one that assembles them (configs.schema)."""

from __future__ import annotations


class ConfigRuleError(ValueError):
    """A rule that spans fields, raised inside validators; `key` is relative to its section."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.rule = message
