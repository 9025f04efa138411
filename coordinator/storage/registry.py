"""The coordinator's durable memory: workers, their profiles, the plan and progress, in SQLite.

Membership and assignments are committed before an RPC answers, so a `kill -9` loses no
admitted worker and no assignment. Heartbeat counters arrive many times a second on a large
swarm; they are applied in memory and flushed in one transaction by `flush()` (the server
calls it every second), so a crash loses at most that second of counters, never a worker.

Schema version 2 added who expelled a worker and which join token admitted it; a version 1
state dir is migrated in place when a coordinator opens it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from dataclasses import dataclass, field, fields
from pathlib import Path

from coordinator.storage.join_tokens import REGISTRY_FILE, TokenStore, connect

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    profile BLOB NOT NULL,            -- serialized swarmtrain.v1.WorkerProfile
    state TEXT NOT NULL,              -- active | gone | left | banned | revoked
    stage_index INTEGER NOT NULL,     -- -1 while unassigned
    joined_unix REAL NOT NULL,
    last_heartbeat_unix REAL NOT NULL,
    lease_expires_unix REAL NOT NULL,
    tokens_total INTEGER NOT NULL DEFAULT 0,
    tokens_per_second REAL NOT NULL DEFAULT 0,
    local_step INTEGER NOT NULL DEFAULT 0,
    address TEXT NOT NULL DEFAULT '',
    assigned_version INTEGER NOT NULL DEFAULT 0, -- plan version of its current assignment
    -- schema 2 (appended, as ALTER TABLE does when migrating a version 1 state dir)
    expelled_reason TEXT NOT NULL DEFAULT '',   -- why it was banned; '' otherwise
    join_token_name TEXT NOT NULL DEFAULT ''    -- managed token that admitted it; '' = config token or none
);
CREATE TABLE IF NOT EXISTS plan (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    body TEXT NOT NULL                -- JSON: boundaries, per-worker settings, note
);
CREATE TABLE IF NOT EXISTS progress (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    trained_tokens INTEGER NOT NULL,
    loss_sum REAL NOT NULL,
    loss_count INTEGER NOT NULL,
    last_loss REAL                    -- NULL until the last stage reports a loss
);
"""

ACTIVE, GONE, LEFT = "active", "gone", "left"
BANNED, REVOKED = "banned", "revoked"
EXPELLED = (BANNED, REVOKED)  # states a worker never returns from
_MIGRATIONS = {  # from schema version N to N + 1
    1: ["ALTER TABLE workers ADD COLUMN expelled_reason TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE workers ADD COLUMN join_token_name TEXT NOT NULL DEFAULT ''"],
}


class RegistryError(Exception):
    """The state directory cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    token_hash: str
    profile: bytes
    state: str
    stage_index: int
    joined_unix: float
    last_heartbeat_unix: float
    lease_expires_unix: float
    tokens_total: int = 0
    tokens_per_second: float = 0.0
    local_step: int = 0
    address: str = ""
    assigned_version: int = 0
    expelled_reason: str = ""
    join_token_name: str = ""


_COLUMNS = ", ".join(f.name for f in fields(WorkerRecord))
_PLACEHOLDERS = ", ".join("?" for _ in fields(WorkerRecord))


@dataclass
class Progress:
    trained_tokens: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    last_loss: float = float("nan")


@dataclass
class _Dirty:
    workers: set[str] = field(default_factory=set)
    progress: bool = False


def hash_token(token: str) -> str:
    """Session tokens are stored hashed: a copied state directory cannot impersonate workers."""
    return hashlib.sha256(token.encode()).hexdigest()


class Registry:
    """SQLite-backed registry. Not thread-safe: the coordinator uses it from one event loop."""

    def __init__(self, state_dir: str | Path, run_id: str, config_hash: str) -> None:
        self.path = Path(state_dir) / REGISTRY_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = connect(self.path)
            self._db.executescript(_SCHEMA)
            self.tokens = TokenStore(self._db)
        except (OSError, sqlite3.Error) as err:
            raise RegistryError(f"state dir {state_dir}: cannot open {self.path.name}: {err}") from None
        self._check_run(run_id, config_hash)
        self.workers: dict[str, WorkerRecord] = {
            row[0]: WorkerRecord(*row) for row in self._db.execute(f"SELECT {_COLUMNS} FROM workers")
        }
        row = self._db.execute("SELECT trained_tokens, loss_sum, loss_count, last_loss FROM progress").fetchone()
        self.progress = Progress(*row[:3], _nan_if_none(row[3])) if row else Progress()
        self._dirty = _Dirty()

    def _check_run(self, run_id: str, config_hash: str) -> None:
        """A state dir belongs to one run: refuse to mix another run's registry into it."""
        stored = dict(self._db.execute("SELECT key, value FROM meta"))
        wanted = {"schema_version": str(SCHEMA_VERSION), "run_id": run_id, "config_hash": config_hash}
        if not stored:
            with self._transaction():
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
            return
        for key in ("run_id", "config_hash"):  # before migrating: another run's dir stays untouched
            if stored.get(key) != wanted[key]:
                raise RegistryError(
                    f"state dir {self.path.parent} holds {key}={stored.get(key)!r}, this run has {wanted[key]!r}: "
                    "use another --state-dir for a different run, or move the old one away"
                )
        self._migrate(stored.get("schema_version", ""))

    def _migrate(self, version: str) -> None:
        """Bring an older state dir up to SCHEMA_VERSION in one transaction: all steps or none."""
        if version == str(SCHEMA_VERSION):
            return
        if not version.isdigit() or int(version) not in _MIGRATIONS:
            raise RegistryError(
                f"state dir {self.path.parent} has registry schema {version!r}; this swarmtrain reads "
                f"schema {SCHEMA_VERSION}: run the swarmtrain release that wrote it, or use another --state-dir"
            )
        with self._transaction():
            for step in range(int(version), SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    self._db.execute(statement)
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    @property
    def connection(self) -> sqlite3.Connection:
        """The database, for the coordinator's other durable tables (coordinator/storage/checkpoints.py)."""
        return self._db

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # ---- membership: committed before the caller answers -------------------------------

    def upsert_worker(self, record: WorkerRecord) -> None:
        with self._transaction():
            self._write_worker(record)
        self.workers[record.worker_id] = record
        self._dirty.workers.discard(record.worker_id)

    def update_workers(self, records: list[WorkerRecord]) -> None:
        """Commit several workers at once (a re-plan moves many)."""
        with self._transaction():
            for record in records:
                self._write_worker(record)
        for record in records:
            self.workers[record.worker_id] = record
            self._dirty.workers.discard(record.worker_id)

    def _write_worker(self, r: WorkerRecord) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO workers ({_COLUMNS}) VALUES ({_PLACEHOLDERS})",
            tuple(getattr(r, f.name) for f in fields(r)),
        )

    def save_plan(self, version: int, body: dict, moved: list[WorkerRecord], progress: Progress | None = None) -> None:
        """Commit a plan and the workers it (re)assigned in one transaction; `progress` replaces the
        trained tokens and loss (a rollback)."""
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO plan VALUES (1, ?, ?)", (version, json.dumps(body)))
            for record in moved:
                self._write_worker(record)
            if progress is not None:
                self._write_progress(progress)
        if progress is not None:
            self.progress = progress
            self._dirty.progress = False
        for record in moved:
            self.workers[record.worker_id] = record
            self._dirty.workers.discard(record.worker_id)

    def load_plan(self) -> tuple[int, dict] | None:
        row = self._db.execute("SELECT version, body FROM plan").fetchone()
        return (row[0], json.loads(row[1])) if row else None

    # ---- counters: in memory now, durable at the next flush ----------------------------

    def record_heartbeat(self, record: WorkerRecord) -> None:
        self.workers[record.worker_id] = record
        self._dirty.workers.add(record.worker_id)

    def add_progress(self, tokens: int, loss_sum: float, loss_count: int) -> None:
        p = self.progress
        p.trained_tokens += tokens
        if loss_count:
            p.loss_sum += loss_sum
            p.loss_count += loss_count
            p.last_loss = loss_sum / loss_count
        self._dirty.progress = True

    def flush(self) -> int:
        """Write buffered heartbeat state in one transaction; returns rows written."""
        dirty, self._dirty = self._dirty, _Dirty()
        if not dirty.workers and not dirty.progress:
            return 0
        with self._transaction():
            for worker_id in dirty.workers:
                self._write_worker(self.workers[worker_id])
            if dirty.progress:
                self._write_progress(self.progress)
        return len(dirty.workers) + int(dirty.progress)

    def _write_progress(self, p: Progress) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO progress VALUES (1, ?, ?, ?, ?)",
            (p.trained_tokens, p.loss_sum, p.loss_count, None if math.isnan(p.last_loss) else p.last_loss),
        )

    # ---- queries -----------------------------------------------------------------------

    def active(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.state == ACTIVE]

    def close(self) -> None:
        self.flush()
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def new_record(worker_id: str, token: str, profile: bytes, now: float, lease_s: float, address: str,
               join_token_name: str = "") -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        token_hash=hash_token(token),
        profile=profile,
        state=ACTIVE,
        stage_index=-1,
        joined_unix=now,
        last_heartbeat_unix=now,
        lease_expires_unix=now + lease_s,
        address=address,
        join_token_name=join_token_name,
    )



def _nan_if_none(value: float | None) -> float:
    # SQLite stores NaN as NULL: "no loss yet" round-trips as NULL <-> NaN
    return math.nan if value is None else value
