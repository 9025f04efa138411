"""Ports the coordinator owns alone, and who holds one it cannot have.

gRPC and libp2p both bind with SO_REUSEPORT by default, so a second coordinator on a live one's
port would start quietly and the kernel would share the swarm's connections between them. The
coordinator therefore binds without it, and checks a port before handing it to a library that
would not say why it failed; the check names the holder from /proc where it can.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

# go-libp2p's TCP transport reads this: the coordinator's P2P daemon then binds its port alone
LIBP2P_REUSEPORT_ENV = "LIBP2P_TCP_REUSEPORT"
GRPC_EXCLUSIVE_OPTIONS = [("grpc.so_reuseport", 0)]

_LISTEN = "0A"  # TCP state in /proc/net/tcp


def port_taken(host: str, port: int) -> bool:
    """Whether a TCP listener holds `port` (0 = any port: never taken). SO_REUSEADDR only lets a
    port in TIME_WAIT be reused, as after a restart; a live listener still refuses the bind."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def busy_port_message(host: str, port: int, flag: str, what: str) -> str:
    holder = port_holder(port)
    held = f" ({holder} holds it)" if holder else ""
    return f"cannot listen on {host}:{port} for {what}: the port is in use{held}; pick another with {flag}"


def port_holder(port: int) -> str | None:
    """'pid 123 (coordinator)': a process listening on TCP `port`, or None if /proc cannot tell."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return f"pid {proc.name} ({_name(proc)})"
    return None


def _listening_inodes(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(f"socket:[{fields[9]}]")
    return found


def _name(proc: Path) -> str:
    """A process's command line, shortened: `python -m coordinator.app.cli` reads as the role."""
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if "-m" in words and words.index("-m") + 1 < len(words):
        return words[words.index("-m") + 1].split(".")[0]
    return Path(words[0]).name if words else "?"
