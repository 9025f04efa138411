"""`worker --pretrained DIR`: a volunteer's own copy of the checkpoint the run starts from.

A worker that has the pretrained files (say, downloaded once from Hugging Face) reads its stage
from them instead of downloading the stage from the coordinator. The copy is checked twice: its
layout and shards when the worker starts, and after joining its fingerprint (config.json, the
index, each file's name and size) against the coordinator's and its tensors against the run's
model section, so a different download never trains silently. Problems raise PretrainedError
with the one line the volunteer sees.
"""

from __future__ import annotations

from pathlib import Path

from configs.pretrained import PretrainedCheckpoint, PretrainedError, open_pretrained
from configs.schema import RunConfig


def open_local_copy(directory: Path) -> PretrainedCheckpoint:
    try:
        return open_pretrained(directory)
    except PretrainedError as err:
        raise PretrainedError(f"--pretrained: {err}") from None


def check_local_copy(local: PretrainedCheckpoint, coordinators: str, config: RunConfig) -> None:
    """Raise PretrainedError unless `local` is the checkpoint this run starts from."""
    where = f"--pretrained {local.directory}"
    if not coordinators:
        raise PretrainedError(f"{where}: this run starts from random weights, not a pretrained checkpoint; "
                              "drop --pretrained")
    if local.fingerprint != coordinators:
        raise PretrainedError(f"{where}: differs from the coordinator's checkpoint (fingerprint "
                              f"{local.fingerprint[:12]} here, {coordinators[:12]} there: another revision, dtype "
                              "or sharding); download the same files, or drop --pretrained to get the weights "
                              "from the coordinator")
    try:
        open_pretrained(local.directory, config.model)
    except PretrainedError as err:
        raise PretrainedError(f"--pretrained: {err}") from None
