"""The state dir lock and the port checks a coordinator uses to own its state and ports alone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from coordinator.api.ports import busy_port_message, port_holder, port_taken
from coordinator.storage.state_lock import LOCK_FILE, StateDirBusy, StateDirLock


def test_a_second_lock_on_a_state_dir_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = StateDirLock(tmp_path / "state")
    first.acquire()
    try:
        with pytest.raises(StateDirBusy) as caught:
            StateDirLock(tmp_path / "state").acquire()
        message = str(caught.value)
        assert f"pid {os.getpid()}" in message and "--state-dir" in message and "\n" not in message
    finally:
        first.release()
    again = StateDirLock(tmp_path / "state")  # released: free for the next coordinator
    again.acquire()
    again.release()
    assert (tmp_path / "state" / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_listening_port_is_taken_and_its_holder_named() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as gRPC and libp2p bind
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_taken("127.0.0.1", port)
        assert port_holder(port) is not None and port_holder(port).startswith(f"pid {os.getpid()} ")
        message = busy_port_message("127.0.0.1", port, "--grpc-port", "gRPC")
        assert f"127.0.0.1:{port}" in message and "pick another with --grpc-port" in message
        assert f"pid {os.getpid()}" in message
    assert not port_taken("127.0.0.1", port)
    assert not port_taken("127.0.0.1", 0)  # 0: any free port, never taken


def test_a_forked_child_does_not_hold_the_state_dir_lock(tmp_path: Path) -> None:
    lock = StateDirLock(tmp_path / "state")
    lock.acquire()
    hold, started = os.pipe(), os.pipe()
    child = os.fork()
    if child == 0:  # the child outlives the lock's release below, as a DHT process might
        os.write(started[1], b"!")  # fork's after-child handlers have run by now
        os.read(hold[0], 1)
        os._exit(0)
    try:
        assert os.read(started[0], 1) == b"!"
        lock.release()
        again = StateDirLock(tmp_path / "state")
        again.acquire()  # free although the child still runs
        again.release()
    finally:
        os.write(hold[1], b"!")
        os.waitpid(child, 0)
        for fd in (*hold, *started):
            os.close(fd)
