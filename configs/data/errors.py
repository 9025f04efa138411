"""Errors shared by the data modules (tokenizer, corpus, token data)."""

from __future__ import annotations


class DataError(ValueError):
    """Training data the user must fix. `str(err)` is one line that names the path and the fix."""
