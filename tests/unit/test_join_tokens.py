"""Join tokens in SQLite (hashes only), the `coordinator token` command, and the schema 1 -> 2 migration."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from configs.loader import load_config
from coordinator.app.token_cli import token_main, token_table
from coordinator.storage.join_tokens import REGISTRY_FILE, TokenError, TokenStore, hash_join_token
from coordinator.storage.registry import SCHEMA_VERSION, Registry, RegistryError


def test_a_token_is_shown_once_and_stored_only_as_its_hash(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path)
    token = store.add("alice", 1000.0)
    assert len(token) >= 32
    assert store.by_hash() == {hash_join_token(token): store.get("alice")}
    store.close()
    assert token.encode() not in (tmp_path / REGISTRY_FILE).read_bytes()
    raw = sqlite3.connect(tmp_path / REGISTRY_FILE).execute("SELECT * FROM join_tokens").fetchall()
    assert token not in {str(cell) for row in raw for cell in row}


def test_a_token_passes_as_a_command_line_argument(tmp_path: Path) -> None:
    """`worker --join-token TOKEN` must take every token: none may look like a flag or need quoting."""
    store = TokenStore.open(tmp_path)
    tokens = [store.add(f"t{i}", 0.0) for i in range(500)]  # base64url began with "-" in ~8 of 500
    assert all(t[0] != "-" and t.isalnum() and len(t) >= 32 for t in tokens)


def test_revoke_is_kept_once_and_names_are_unique(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path)
    store.add("alice", 1000.0)
    assert store.revoke("alice", 2000.0).revoked_unix == 2000.0
    assert store.revoke("alice", 3000.0).revoked_unix == 2000.0  # the first revocation stands
    with pytest.raises(TokenError, match="already exists"):
        store.add("alice", 4000.0)  # a revoked name is not reissued: the history stays readable
    with pytest.raises(TokenError, match="no join token named 'bob'"):
        store.revoke("bob", 4000.0)
    with pytest.raises(TokenError, match="token name"):
        store.add("-bad name", 4000.0)


def test_open_refuses_a_missing_state_dir(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="does not exist"):
        TokenStore.open(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_the_list_is_a_table_of_names_and_states(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path)
    assert token_table(store.all()).startswith("no join tokens yet")
    store.add("alice", 0.0)
    store.add("bob", 60.0)
    store.revoke("alice", 3600.0)
    lines = token_table(store.all()).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "ISSUED", "(UTC)", "REVOKED", "(UTC)"]
    assert lines[1].split() == ["alice", "revoked", "1970-01-01", "00:00:00", "1970-01-01", "01:00:00"]
    assert lines[2].split() == ["bob", "active", "1970-01-01", "00:01:00", "-"]


def test_cli_adds_lists_and_revokes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert token_main(["add", "alice", "--state-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert "\n" not in token and len(token) >= 32  # stdout is the token alone: TOKEN=$(coordinator token add ..)
    assert "shown only now" in err
    assert token_main(["revoke", "alice", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("join token alice revoked")
    assert token_main(["list", "--config", "tiny", "--set", f"coordinator.state_dir={tmp_path}"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["alice", "revoked"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["add", "alice"], "error: a join token named 'alice' already exists: pick another name"),
        (["revoke", "bob"], "error: no join token named 'bob': see `coordinator token list`"),
        (["add", "a b"], "error: token name 'a b': use 1-64 letters"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              argv: list[str], expected: str) -> None:
    TokenStore.open(tmp_path).add("alice", 0.0)
    with pytest.raises(SystemExit) as caught:
        token_main([*argv, "--state-dir", str(tmp_path)])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines


@pytest.mark.parametrize("argv", [["list", "--state-dir", "{missing}"], ["list"]])
def test_cli_without_a_usable_state_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    argv: list[str]) -> None:
    argv = [a.format(missing=tmp_path / "missing") for a in argv]
    with pytest.raises(SystemExit) as caught:
        token_main(argv)
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ("does not exist" in lines[0] or "pass --state-dir" in lines[0]), lines


# ---- the registry's schema ---------------------------------------------------------------

_SCHEMA_1_WORKERS = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE workers (
    worker_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, profile BLOB NOT NULL, state TEXT NOT NULL,
    stage_index INTEGER NOT NULL, joined_unix REAL NOT NULL, last_heartbeat_unix REAL NOT NULL,
    lease_expires_unix REAL NOT NULL, tokens_total INTEGER NOT NULL DEFAULT 0,
    tokens_per_second REAL NOT NULL DEFAULT 0, local_step INTEGER NOT NULL DEFAULT 0,
    address TEXT NOT NULL DEFAULT '', assigned_version INTEGER NOT NULL DEFAULT 0
);
"""


def _schema_1_state_dir(path: Path, run_id: str, config_hash: str) -> None:
    path.mkdir()
    db = sqlite3.connect(path / REGISTRY_FILE)
    db.executescript(_SCHEMA_1_WORKERS)
    db.executemany("INSERT INTO meta VALUES (?, ?)",
                   [("schema_version", "1"), ("run_id", run_id), ("config_hash", config_hash)])
    db.execute("INSERT INTO workers VALUES ('w-00aa11bb22cc', 'h', x'', 'active', 0, 1, 2, 3, 40, 5.0, 6, "
               "'ipv4:127.0.0.1:1', 7)")
    db.commit()
    db.close()


def test_a_schema_1_state_dir_is_migrated_and_keeps_its_workers(tmp_path: Path) -> None:
    config = load_config("tiny")
    run_id, config_hash = config.coordinator.run_id, config.fingerprint()
    _schema_1_state_dir(tmp_path / "state", run_id, config_hash)
    registry = Registry(tmp_path / "state", run_id, config_hash)
    record = registry.workers["w-00aa11bb22cc"]
    assert (record.state, record.tokens_total, record.assigned_version) == ("active", 40, 7)
    assert (record.expelled_reason, record.join_token_name) == ("", "")
    registry.close()
    db = sqlite3.connect(tmp_path / "state" / REGISTRY_FILE)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.close()
    again = Registry(tmp_path / "state", run_id, config_hash)  # opening a migrated dir is a no-op
    assert again.workers["w-00aa11bb22cc"] == record
    again.close()


def test_another_runs_schema_1_dir_is_refused_untouched(tmp_path: Path) -> None:
    _schema_1_state_dir(tmp_path / "state", "other-run", "0" * 16)
    config = load_config("tiny")
    with pytest.raises(RegistryError, match="run_id='other-run'"):
        Registry(tmp_path / "state", config.coordinator.run_id, config.fingerprint())
    db = sqlite3.connect(tmp_path / "state" / REGISTRY_FILE)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)


def test_a_state_dir_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    config = load_config("tiny")
    Registry(tmp_path, config.coordinator.run_id, config.fingerprint()).close()
    db = sqlite3.connect(tmp_path / REGISTRY_FILE)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="registry schema '99'"):
        Registry(tmp_path, config.coordinator.run_id, config.fingerprint())
