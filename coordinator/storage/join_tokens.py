"""Operator-managed join tokens, stored as hashes in the state dir's SQLite next to the registry.

`coordinator token add|list|revoke` writes the table while a coordinator may be serving from
the same file: SQLite's WAL lets the coordinator keep reading, and the busy timeout makes either
side wait for the other's short write instead of failing. The coordinator re-reads the table on
every sweep, so a revocation reaches a running swarm within a heartbeat interval.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

REGISTRY_FILE = "registry.sqlite3"
BUSY_TIMEOUT_S = 5.0  # a writer on the other side holds the lock for milliseconds
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS join_tokens (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,  -- sha256 of the token; the token itself is never stored
    created_unix REAL NOT NULL,
    revoked_unix REAL                 -- NULL while the token admits workers
);
"""


class TokenError(Exception):
    """A token command that cannot be carried out; the message is one line for the operator."""


@dataclass(frozen=True)
class JoinToken:
    name: str
    created_unix: float
    revoked_unix: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_unix is not None


def hash_join_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise TokenError(f"token name {name[:80]!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")


def connect(path: Path) -> sqlite3.Connection:
    """The registry file, opened the way the coordinator opens it (autocommit, WAL, busy timeout)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class TokenStore:
    """The join_tokens table of one registry database."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._db.executescript(_SCHEMA)

    @classmethod
    def open(cls, state_dir: str | Path) -> TokenStore:
        """For the CLI: the state dir must exist (a typo must not create a second, empty swarm)."""
        folder = Path(state_dir)
        if not folder.is_dir():
            raise TokenError(f"state dir {folder} does not exist: pass the coordinator's --state-dir")
        try:
            return cls(connect(folder / REGISTRY_FILE))
        except sqlite3.Error as err:
            raise TokenError(f"state dir {folder}: cannot open {REGISTRY_FILE}: {err}") from None

    def add(self, name: str, now: float) -> str:
        """Store a fresh token's hash under `name`; the token is returned here and never again."""
        check_name(name)
        # hex, not base64url: a token that began with "-" (1 in 64 of those) would be read as a
        # flag by `worker --join-token TOKEN`
        token = secrets.token_hex(24)
        try:
            self._db.execute("INSERT INTO join_tokens VALUES (?, ?, ?, NULL)", (name, hash_join_token(token), now))
        except sqlite3.IntegrityError:
            raise TokenError(f"a join token named {name!r} already exists: pick another name") from None
        return token

    def revoke(self, name: str, now: float) -> JoinToken:
        """Mark `name` revoked (once: revoking again keeps the first time). Returns the token's row."""
        self._db.execute("UPDATE join_tokens SET revoked_unix = ? WHERE name = ? AND revoked_unix IS NULL",
                         (now, name))
        token = self.get(name)
        if token is None:
            raise TokenError(f"no join token named {name[:80]!r}: see `coordinator token list`")
        return token

    def get(self, name: str) -> JoinToken | None:
        row = self._db.execute("SELECT name, created_unix, revoked_unix FROM join_tokens WHERE name = ?",
                               (name,)).fetchone()
        return JoinToken(*row) if row else None

    def all(self) -> list[JoinToken]:
        rows = self._db.execute("SELECT name, created_unix, revoked_unix FROM join_tokens ORDER BY created_unix, name")
        return [JoinToken(*row) for row in rows]

    def by_hash(self) -> dict[str, JoinToken]:
        """Every token keyed by its hash: what the coordinator matches a presented token against."""
        rows = self._db.execute("SELECT token_hash, name, created_unix, revoked_unix FROM join_tokens")
        return {row[0]: JoinToken(*row[1:]) for row in rows}

    def close(self) -> None:
        self._db.close()
