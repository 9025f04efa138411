"""The data ledger's ranges (coordinator/swarm/data_ledger.py), in the registry's SQLite database.

Every change is committed before the heartbeat that caused it is answered: a range a replica
was told it holds, or whose training was acknowledged, survives a coordinator crash.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import astuple, dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS data_ranges (
    range_id INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    start INTEGER NOT NULL,           -- positions [start, end) of the epoch's permutation
    end INTEGER NOT NULL,
    trained INTEGER NOT NULL,         -- the first `trained` positions are trained
    worker_id TEXT NOT NULL           -- '' when finished or waiting to be handed out
);
CREATE TABLE IF NOT EXISTS data_range_ids (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next INTEGER NOT NULL             -- above every range id ever saved, rewound ones included
);
CREATE TABLE IF NOT EXISTS data_range_snapshots (
    checkpoint_id INTEGER PRIMARY KEY,
    ranges TEXT NOT NULL              -- JSON: every row of data_ranges when the checkpoint opened
);
"""


@dataclass(frozen=True)
class DataRange:
    range_id: int
    epoch: int
    start: int  # positions [start, end) of the epoch's permutation
    end: int
    trained: int = 0  # the first `trained` positions are trained, as reported
    worker_id: str = ""  # who holds it; "" once finished or while waiting to be handed out

    @property
    def done(self) -> bool:
        return self.start + self.trained >= self.end


class DataRangeStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._db.executescript(_SCHEMA)

    def load(self) -> list[DataRange]:
        rows = self._db.execute("SELECT range_id, epoch, start, end, trained, worker_id FROM data_ranges")
        return [DataRange(*row) for row in rows]

    def save(self, ranges: Sequence[DataRange], *, replace_all: bool = False) -> None:
        """Write these ranges (in one transaction); `replace_all`: and drop every other."""
        if not ranges and not replace_all:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if replace_all:
                self._db.execute("DELETE FROM data_ranges")
            self._db.executemany("INSERT OR REPLACE INTO data_ranges VALUES (?, ?, ?, ?, ?, ?)",
                                 [astuple(r) for r in ranges])
            if ranges:
                self._db.execute("INSERT INTO data_range_ids VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET "
                                 "next = max(next, excluded.next)", (max(r.range_id for r in ranges) + 1,))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def next_id(self) -> int:
        """Above every range id ever saved: ids never repeat, across rewinds and restarts."""
        row = self._db.execute("SELECT next FROM data_range_ids").fetchone()
        return row[0] if row else 1

    def snapshot(self, checkpoint_id: int) -> None:
        """Keep the whole ledger as it is now with checkpoint `checkpoint_id` (once: the first call)."""
        rows = [astuple(r) for r in self.load()]
        self._db.execute("INSERT OR IGNORE INTO data_range_snapshots VALUES (?, ?)", (checkpoint_id, json.dumps(rows)))

    def snapshot_of(self, checkpoint_id: int) -> list[DataRange] | None:
        row = self._db.execute("SELECT ranges FROM data_range_snapshots WHERE checkpoint_id = ?",
                               (checkpoint_id,)).fetchone()
        return [DataRange(*r) for r in json.loads(row[0])] if row else None
