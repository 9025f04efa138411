"""The swarm's checkpoints, kept by the coordinator: which exist, which are complete, their files.

Every `checkpoint_interval_s` the coordinator opens a checkpoint for the current plan and asks
one replica of each stage (the writer) to upload its stage's state: parameters, optimizer state,
the averaging anchor, its step and, on stage 0, its data position, as one safetensors file. The
file is written next to its final name, checked, fsynced and renamed; when every stage's part
is in, a manifest is written the same way, the directory is renamed from `<id>.partial` to its
final name and the checkpoint is recorded complete in SQLite, in that order. A crash at any
point leaves either a complete checkpoint or a partial directory that the next start deletes.
The newest `checkpoints_kept` complete checkpoints are kept.

Checkpoints live with the coordinator because volunteers are transient: a new swarm's workers,
on whatever machines, resume from them (LoadCheckpoint) when no live replica of their stage
holds fresher state. Parameter names are global (worker/model/gptj.py), so a stage of a new plan
with other boundaries reads its layers from the files that hold them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protos import swarmtrain_pb2 as pb

FORMAT = "swarmtrain-checkpoint/1"
CHUNK_BYTES = 192 * 1024  # under the coordinator's 256 KiB message limit
# A stage file holds per parameter: the value, Adam's two moments, the anchor and the outer
# momentum, all fp32: 20 bytes. Anything much bigger is not a checkpoint of that span.
BYTES_PER_PARAM_LIMIT = 24
FILE_OVERHEAD_LIMIT = 4 * 1024 * 1024  # safetensors header, step scalars, metadata

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    opened_unix REAL NOT NULL,
    boundaries TEXT NOT NULL,         -- JSON: the plan's layer boundaries when it was opened
    trained_tokens INTEGER NOT NULL,  -- the swarm's progress when it was opened
    state TEXT NOT NULL,              -- open | complete | abandoned
    completed_unix REAL,
    size_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS checkpoint_parts (
    checkpoint_id INTEGER NOT NULL,
    stage_index INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (checkpoint_id, stage_index)
);
"""


class CheckpointRefused(Exception):
    """An upload or download that cannot be served; `code` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Part:
    stage_index: int
    worker_id: str
    step: int
    size_bytes: int
    sha256: str


@dataclass
class Checkpoint:
    checkpoint_id: int
    opened_unix: float
    boundaries: tuple[int, ...]
    trained_tokens: int
    state: str = "open"
    completed_unix: float | None = None
    size_bytes: int = 0
    parts: dict[int, Part] = field(default_factory=dict)
    writers: dict[int, str] = field(default_factory=dict)  # stage -> worker asked to write it (open only)

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) - 1

    def span(self, stage: int) -> tuple[int, int]:
        return self.boundaries[stage], self.boundaries[stage + 1]


# ---- spans and limits (pure) ----------------------------------------------------------


def stages_holding(boundaries: Sequence[int], start: int, end: int) -> list[int]:
    """Indices of the stages of `boundaries` that hold any of the layers [start, end)."""
    return [s for s in range(len(boundaries) - 1) if boundaries[s] < end and start < boundaries[s + 1]]


def upload_limit(params_in_span: int) -> int:
    return params_in_span * BYTES_PER_PARAM_LIMIT + FILE_OVERHEAD_LIMIT


# ---- the store ---------------------------------------------------------------------------


class CheckpointStore:
    """Checkpoints under `root`, recorded in the registry's SQLite database `db`."""

    def __init__(self, root: Path, db: sqlite3.Connection, keep: int, clock: Callable[[], float]) -> None:
        self.root, self.db, self.keep, self.clock = Path(root), db, keep, clock
        self.root.mkdir(parents=True, exist_ok=True)
        db.executescript(_SCHEMA)
        self.open: Checkpoint | None = None
        self.complete: list[Checkpoint] = []  # oldest first
        self._load()

    # ---- startup -----------------------------------------------------------------------

    def _load(self) -> None:
        parts: dict[int, dict[int, Part]] = {}
        for row in self.db.execute("SELECT checkpoint_id, stage_index, worker_id, step, size_bytes, sha256 "
                                   "FROM checkpoint_parts"):
            parts.setdefault(row[0], {})[row[1]] = Part(*row[1:])
        for row in self.db.execute("SELECT id, opened_unix, boundaries, trained_tokens, state, completed_unix, "
                                   "size_bytes FROM checkpoints ORDER BY id"):
            checkpoint = Checkpoint(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4], row[5], row[6],
                                    parts.get(row[0], {}))
            if checkpoint.state == "complete":
                if (self.final_dir(checkpoint.checkpoint_id) / "manifest.json").is_file():
                    self.complete.append(checkpoint)
                else:
                    print(f"warning: checkpoint {checkpoint.checkpoint_id} is recorded complete but its "
                          f"directory is missing; it is forgotten", flush=True)
                    self._set_state(checkpoint.checkpoint_id, "abandoned")
            elif checkpoint.state == "open":  # the coordinator stopped while it was being written
                self._set_state(checkpoint.checkpoint_id, "abandoned")
        for path in self.root.glob("*.partial"):
            shutil.rmtree(path, ignore_errors=True)

    # ---- paths -------------------------------------------------------------------------

    def final_dir(self, checkpoint_id: int) -> Path:
        return self.root / f"{checkpoint_id:06d}"

    def partial_dir(self, checkpoint_id: int) -> Path:
        return self.root / f"{checkpoint_id:06d}.partial"

    @property
    def latest(self) -> Checkpoint | None:
        return self.complete[-1] if self.complete else None

    def next_id(self) -> int:
        row = self.db.execute("SELECT MAX(id) FROM checkpoints").fetchone()
        return (row[0] or 0) + 1

    # ---- opening and closing -----------------------------------------------------------

    def open_checkpoint(self, boundaries: Sequence[int], writers: dict[int, str], trained_tokens: int) -> Checkpoint:
        if self.open is not None:
            raise RuntimeError("a checkpoint is already open")
        checkpoint = Checkpoint(self.next_id(), self.clock(), tuple(boundaries), trained_tokens, writers=writers)
        self.partial_dir(checkpoint.checkpoint_id).mkdir(parents=True)
        self.db.execute("INSERT INTO checkpoints (id, opened_unix, boundaries, trained_tokens, state) "
                        "VALUES (?, ?, ?, ?, 'open')",
                        (checkpoint.checkpoint_id, checkpoint.opened_unix, json.dumps(list(boundaries)),
                         trained_tokens))
        self.open = checkpoint
        return checkpoint

    def abandon(self, why: str) -> None:
        checkpoint, self.open = self.open, None
        if checkpoint is None:
            return
        self._set_state(checkpoint.checkpoint_id, "abandoned")
        shutil.rmtree(self.partial_dir(checkpoint.checkpoint_id), ignore_errors=True)
        print(f"checkpoint {checkpoint.checkpoint_id} abandoned: {why}", flush=True)

    def set_writers(self, writers: dict[int, str]) -> None:
        """Who uploads each stage of the open checkpoint (a writer that went away is replaced)."""
        assert self.open is not None
        self.open.writers = dict(writers)

    def _set_state(self, checkpoint_id: int, state: str) -> None:
        self.db.execute("UPDATE checkpoints SET state = ? WHERE id = ?", (state, checkpoint_id))

    def request_for(self, worker_id: str, stage_index: int) -> pb.CheckpointRequest | None:
        """What to ask `worker_id` in its heartbeat reply: upload its stage, if it is that stage's
        writer and has not uploaded it yet."""
        checkpoint = self.open
        if (checkpoint is None or checkpoint.writers.get(stage_index) != worker_id
                or stage_index in checkpoint.parts):
            return None
        start, end = checkpoint.span(stage_index)
        return pb.CheckpointRequest(checkpoint_id=checkpoint.checkpoint_id, stage_index=stage_index,
                                    layer_start=start, layer_end=end)

    # ---- uploads -----------------------------------------------------------------------

    def check_upload(self, header: pb.CheckpointFile, limit: int) -> Checkpoint:
        """The open checkpoint that `header` (already authenticated) may write a part of."""
        checkpoint = self.open
        if checkpoint is None or header.checkpoint_id != checkpoint.checkpoint_id:
            raise CheckpointRefused("FAILED_PRECONDITION",
                                    f"checkpoint {header.checkpoint_id} is not open for writing")
        stage = header.stage_index
        if stage >= checkpoint.num_stages or checkpoint.writers.get(stage) != header.worker_id:
            raise CheckpointRefused("PERMISSION_DENIED",
                                    f"worker {header.worker_id} was not asked to write stage {stage} of "
                                    f"checkpoint {checkpoint.checkpoint_id}")
        if (header.layer_start, header.layer_end) != checkpoint.span(stage):
            start, end = checkpoint.span(stage)
            raise CheckpointRefused("INVALID_ARGUMENT",
                                    f"stage {stage} of checkpoint {checkpoint.checkpoint_id} holds layers "
                                    f"[{start}, {end}), not [{header.layer_start}, {header.layer_end})")
        if stage in checkpoint.parts:
            raise CheckpointRefused("ALREADY_EXISTS",
                                    f"stage {stage} of checkpoint {checkpoint.checkpoint_id} is written already")
        if not 0 < header.size_bytes <= limit:
            raise CheckpointRefused("INVALID_ARGUMENT",
                                    f"a {header.size_bytes:,}-byte stage file; layers [{header.layer_start}, "
                                    f"{header.layer_end}) take at most {limit:,}")
        if len(header.sha256) != 64 or any(c not in "0123456789abcdef" for c in header.sha256):
            raise CheckpointRefused("INVALID_ARGUMENT", "sha256 must be 64 lowercase hex digits")
        return checkpoint

    def add_part(self, checkpoint_id: int, part: Part) -> bool:
        """Record a stage's file that `PartWriter` put in place; complete the checkpoint if it was the
        last part missing. Returns whether the checkpoint is complete now."""
        checkpoint = self.open
        if checkpoint is None or checkpoint.checkpoint_id != checkpoint_id:
            raise CheckpointRefused("ABORTED", f"checkpoint {checkpoint_id} was abandoned while its part arrived")
        self.db.execute("INSERT INTO checkpoint_parts VALUES (?, ?, ?, ?, ?, ?)",
                        (checkpoint_id, part.stage_index, part.worker_id, part.step, part.size_bytes, part.sha256))
        checkpoint.parts[part.stage_index] = part
        if len(checkpoint.parts) < checkpoint.num_stages:
            return False
        self._complete(checkpoint)
        return True

    def _complete(self, checkpoint: Checkpoint) -> None:
        directory = self.partial_dir(checkpoint.checkpoint_id)
        checkpoint.completed_unix = self.clock()
        checkpoint.size_bytes = sum(p.size_bytes for p in checkpoint.parts.values())
        manifest = {
            "format": FORMAT,
            "checkpoint_id": checkpoint.checkpoint_id,
            "boundaries": list(checkpoint.boundaries),
            "trained_tokens": checkpoint.trained_tokens,
            "opened_unix": checkpoint.opened_unix,
            "completed_unix": checkpoint.completed_unix,
            "stages": [{"stage_index": p.stage_index, "file": f"stage-{p.stage_index:03d}.safetensors",
                        "layers": list(checkpoint.span(p.stage_index)), "step": p.step, "worker_id": p.worker_id,
                        "size_bytes": p.size_bytes, "sha256": p.sha256}
                       for p in sorted(checkpoint.parts.values(), key=lambda p: p.stage_index)],
        }
        staging = directory / "manifest.json.tmp"
        with open(staging, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.rename(staging, directory / "manifest.json")
        _fsync_dir(directory)
        os.rename(directory, self.final_dir(checkpoint.checkpoint_id))
        _fsync_dir(self.root)
        self.db.execute("UPDATE checkpoints SET state = 'complete', completed_unix = ?, size_bytes = ? WHERE id = ?",
                        (checkpoint.completed_unix, checkpoint.size_bytes, checkpoint.checkpoint_id))
        checkpoint.state, checkpoint.writers = "complete", {}
        self.open = None
        self.complete.append(checkpoint)
        self._prune()

    def _prune(self) -> None:
        while len(self.complete) > self.keep:
            old = self.complete.pop(0)
            shutil.rmtree(self.final_dir(old.checkpoint_id), ignore_errors=True)
            self.db.execute("DELETE FROM checkpoint_parts WHERE checkpoint_id = ?", (old.checkpoint_id,))
            self.db.execute("UPDATE checkpoints SET state = 'deleted' WHERE id = ?", (old.checkpoint_id,))

    # ---- downloads ---------------------------------------------------------------------

    def files_for(self, start: int, end: int) -> tuple[Checkpoint, list[tuple[Part, Path]]]:
        """The newest complete checkpoint's files that hold any of the layers [start, end)."""
        checkpoint = self.latest
        if checkpoint is None:
            raise CheckpointRefused("NOT_FOUND", "no complete checkpoint yet")
        if not 0 <= start < end <= checkpoint.boundaries[-1]:
            raise CheckpointRefused("INVALID_ARGUMENT",
                                    f"layers [{start}, {end}) are not a part of [0, {checkpoint.boundaries[-1]})")
        directory = self.final_dir(checkpoint.checkpoint_id)
        return checkpoint, [(checkpoint.parts[s], directory / f"stage-{s:03d}.safetensors")
                            for s in stages_holding(checkpoint.boundaries, start, end)]


class PartWriter:
    """Writes one uploaded stage file into a partial checkpoint directory: data goes to a staging
    file, `finish()` checks size, digest and format, fsyncs and renames it into place. Blocking
    file I/O without database access: run its calls off the event loop."""

    def __init__(self, directory: Path, header: pb.CheckpointFile) -> None:
        self.header = header
        self.directory = directory
        self.final = directory / f"stage-{header.stage_index:03d}.safetensors"
        self.staging = self.final.with_suffix(".tmp")
        self.size = 0
        self._digest = hashlib.sha256()
        self._file = open(self.staging, "wb")  # noqa: SIM115 - closed by finish() or abort()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.header.size_bytes:
            raise CheckpointRefused("INVALID_ARGUMENT", f"more data than the {self.header.size_bytes:,} bytes announced")
        self._digest.update(data)
        self._file.write(data)

    def finish(self) -> Part:
        header = self.header
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self.size != header.size_bytes:
            raise CheckpointRefused("INVALID_ARGUMENT",
                                    f"{self.size:,} bytes arrived of the {header.size_bytes:,} announced")
        if self._digest.hexdigest() != header.sha256:
            raise CheckpointRefused("DATA_LOSS", "the stage file does not match its sha256")
        step = check_stage_file(self.staging, header)
        os.rename(self.staging, self.final)
        _fsync_dir(self.directory)
        return Part(header.stage_index, header.worker_id, step, self.size, header.sha256)

    def abort(self) -> None:
        self._file.close()
        self.staging.unlink(missing_ok=True)


def check_stage_file(path: Path, header: pb.CheckpointFile) -> int:
    """Read back an uploaded stage file's header: it must be safetensors of our format, for the
    announced checkpoint and layers. Returns the stage's step it records."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
    except Exception as err:  # noqa: BLE001 - the library raises several types for a bad file
        raise CheckpointRefused("INVALID_ARGUMENT", f"not a safetensors file ({err})") from None
    expected = {"format": FORMAT, "checkpoint_id": str(header.checkpoint_id),
                "layer_start": str(header.layer_start), "layer_end": str(header.layer_end)}
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        raise CheckpointRefused("INVALID_ARGUMENT",
                                f"the stage file's metadata {', '.join(wrong)} do not match the upload")
    if not any(name.startswith("param/") for name in names):
        raise CheckpointRefused("INVALID_ARGUMENT", "the stage file holds no parameters")
    step = meta.get("step", "")
    if not step.isdigit():
        raise CheckpointRefused("INVALID_ARGUMENT", f"the stage file records step {step!r}")
    return int(step)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_info(checkpoint: Checkpoint) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(
        checkpoint_id=checkpoint.checkpoint_id, completed_unix=checkpoint.completed_unix or 0.0,
        trained_tokens=checkpoint.trained_tokens, size_bytes=checkpoint.size_bytes,
        stage_steps=[checkpoint.parts[s].step for s in range(checkpoint.num_stages)])
