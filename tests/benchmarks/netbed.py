"""A test bed of network namespaces joined by a Linux bridge, each behind a rate-limited veth.

    bed = NetBed(count=5, rate_mbit=20)      # rate_mbit=None: unshaped links
    bed.create()
    proc = bed.popen(0, ["python", "-c", "..."])   # runs inside namespace 0 (address bed.address(0))
    bed.tx_bytes(0)                          # bytes namespace 0 has sent on its link
    bed.destroy()

The root namespace holds the bridge (subnet .1) and reaches every namespace; namespaces reach
each other through it. A token bucket (`tc ... tbf`) shapes egress on both ends of each veth,
so a namespace's upload and download are each capped at the rate. Namespaces listed in
`unshaped` hold measurement instruments (an evaluator): their links are not shaped, and the
others' traffic to and from them bypasses the token bucket (an htb class beside it, chosen
by a u32 filter on the address), so measuring costs the measured links nothing. Every name this module
creates starts with a prefix made of the process id, and `destroy` (also run at exit) removes
exactly those names and stops every process started through `popen`.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Self


class NetBedError(Exception):
    """The bed cannot be built here (not root, tools missing, a command failed)."""


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise NetBedError("network namespaces and tc need root: run this as root")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetBedError(f"missing command(s) {', '.join(missing)}: install iproute2")


# 4 KB, a few packets: what a line of that rate lets through at once. A bucket larger than a
# pipeline's microbatch lets each one through at the veth's speed, as if the link were not
# there (tiny's 4-bit microbatch is ~72 KB). The small bucket costs some CPU: a GSO packet
# larger than it is cut up in software (one 19 Mbit/s stream took 3.3% of 2 cores, against
# 1.1% with a 64 KB bucket).
DEFAULT_BURST = "32kbit"


def _run(*args: str) -> str:
    result = subprocess.run(list(args), check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise NetBedError(f"`{' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


class NetBed:
    def __init__(self, count: int, rate_mbit: float | None, subnet: str = "10.77.0.0/24",
                 burst: str = DEFAULT_BURST, latency: str = "400ms", unshaped: tuple[int, ...] = ()) -> None:
        check_prerequisites()
        self.count, self.rate_mbit, self.burst, self.latency = count, rate_mbit, burst, latency
        if any(not 0 <= i < count for i in unshaped):
            raise NetBedError(f"unshaped namespaces {list(unshaped)} are not all in 0..{count - 1}")
        self.unshaped = tuple(unshaped)
        self.net = ipaddress.ip_network(subnet)
        if count + 2 > self.net.num_addresses - 1:
            raise NetBedError(f"subnet {subnet} is too small for {count} namespaces")
        pid = os.getpid()
        # interface names are limited to 15 characters: keep the prefix short
        self.tag = f"stb{pid}"
        self.bridge = f"{self.tag}b"
        self.namespaces = [f"stb-{pid}-{i}" for i in range(count)]
        self.host_ifs = [f"{self.tag}h{i}" for i in range(count)]
        self.ns_ifs = [f"{self.tag}n{i}" for i in range(count)]
        self._created_ns: list[str] = []
        self._created_links: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []
        atexit.register(self.destroy)

    # ---- addresses --------------------------------------------------------------------

    @property
    def gateway(self) -> str:
        return str(self.net.network_address + 1)

    def address(self, i: int) -> str:
        return str(self.net.network_address + 2 + i)

    # ---- building -----------------------------------------------------------------------

    def create(self) -> None:
        taken = [r for r in _run("ip", "-4", "route").splitlines()
                 if r.split() and r.split()[0] != "default"
                 and ipaddress.ip_network(r.split()[0], strict=False).overlaps(self.net)]
        if taken:
            raise NetBedError(f"subnet {self.net} overlaps an existing route ({taken[0]}): pick another")
        prefix = self.net.prefixlen
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._created_links.append(self.bridge)
        _run("ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            _run("ip", "netns", "add", ns)
            self._created_ns.append(ns)
            host_if, ns_if = self.host_ifs[i], self.ns_ifs[i]
            _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            self._created_links.append(host_if)  # deleting one end deletes both
            _run("ip", "link", "set", ns_if, "netns", ns)
            _run("ip", "link", "set", host_if, "master", self.bridge)
            _run("ip", "link", "set", host_if, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/{prefix}", "dev", ns_if)
            _run("ip", "-n", ns, "link", "set", ns_if, "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", self.gateway)
            if self.rate_mbit is not None and i not in self.unshaped:
                self._shape([], host_if, "src")  # into the namespace: its download
                self._shape(["ip", "netns", "exec", ns], ns_if, "dst")  # its upload

    def _shape(self, where: list[str], dev: str, direction: str) -> None:
        """A token bucket on dev's egress; with unshaped peers, it sits under an htb class and
        a u32 filter sends packets to (dst) or from (src) those peers to a class beside it."""
        tbf = ["tbf", "rate", f"{self.rate_mbit:g}mbit", "burst", self.burst, "latency", self.latency]
        if not self.unshaped:
            _run(*where, "tc", "qdisc", "add", "dev", dev, "root", *tbf)
            return
        tc = [*where, "tc"]
        # both classes far above any rate the bed uses: only the tbf under 1:10 shapes
        _run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10", "r2q", "100000")
        for cls in ("1:10", "1:20"):
            _run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", cls, "htb", "rate", "10gbit")
        _run(*tc, "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", *tbf)
        for peer in self.unshaped:
            _run(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                 "match", "ip", direction, f"{self.address(peer)}/32", "flowid", "1:20")

    def destroy(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its whole session: p2p daemons included
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._procs.clear()
        for file in self._files:
            file.close()
        self._files.clear()
        for ns in reversed(self._created_ns):
            # anything still living in the namespace (a stray daemon) would keep it busy
            pids = subprocess.run(["ip", "netns", "pids", ns], check=False, capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self._created_ns.clear()
        for link in reversed(self._created_links):
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)
        self._created_links.clear()

    def __enter__(self) -> Self:
        self.create()
        return self

    def __exit__(self, *_: object) -> None:
        self.destroy()

    # ---- processes and counters ---------------------------------------------------------

    def popen(self, i: int, command: list[str], log: Path, env: dict[str, str] | None = None,
              stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
        """Start `command` inside namespace i in its own session; stderr (and stdout unless piped) go to `log`."""
        out = log.open("wb")
        self._files.append(out)
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[i], *command],
                                stdout=subprocess.PIPE if stdout_pipe else out, stderr=out,
                                start_new_session=True, env=env)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM the process's session, then SIGKILL what is left."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def tx_bytes(self, i: int) -> int:
        """Bytes namespace i has sent on its link (its veth's counter, read inside the namespace)."""
        out = _run("ip", "netns", "exec", self.namespaces[i], "cat",
                   f"/sys/class/net/{self.ns_ifs[i]}/statistics/tx_bytes")
        return int(out.strip())

    def rx_bytes(self, i: int) -> int:
        out = _run("ip", "netns", "exec", self.namespaces[i], "cat",
                   f"/sys/class/net/{self.ns_ifs[i]}/statistics/rx_bytes")
        return int(out.strip())
