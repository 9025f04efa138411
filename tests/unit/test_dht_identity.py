"""The coordinator's DHT key in its state dir: written once and whole, read back as the same peer
id, and refused with one line when it is not a key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.api.dht import IdentityError, ensure_identity


def test_a_key_is_written_once_and_gives_the_same_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "dht.key"
    first = ensure_identity(path)
    written = path.read_bytes()
    assert ensure_identity(path) == first and path.read_bytes() == written
    assert [p.name for p in tmp_path.iterdir()] == ["dht.key"]  # no temporary file left behind


def test_a_partial_key_from_a_crash_is_replaced(tmp_path: Path) -> None:
    (tmp_path / ".dht.key.partial").write_bytes(b"\x08\x00")  # a write cut short by a crash
    ensure_identity(tmp_path / "dht.key")
    assert [p.name for p in tmp_path.iterdir()] == ["dht.key"]


def test_a_file_that_is_not_a_key_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "dht.key"
    path.write_text("not a key\n")
    with pytest.raises(IdentityError, match="is not a peer key file: move it away"):
        ensure_identity(path)
    assert path.read_text() == "not a key\n"
