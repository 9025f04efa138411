"""A NAT test bed: a public network and homes behind routers that masquerade, in network namespaces.

    bed = NatBed(publics=2, homes=3)
    bed.create()                 # also checks what a home router must do (`verify`)
    bed.address("pub0")          # 10.77.0.10: hosts on the public network reach each other
    bed.address("home1")         # 192.168.1.2: behind router 1, which masquerades as 10.77.0.101
    proc = bed.popen("home1", [sys.executable, "-m", "worker.app.cli", ...])
    bed.destroy()                # also at exit: every namespace and process this bed made

The public network is a bridge in a namespace of its own (the root namespace takes no part).
Public host i sits on it at 10.77.0.(10+i). Home j is a namespace on its own LAN, 192.168.j.0/24,
whose only way out is router namespace j: on the bridge at 10.77.0.(100+j), forwarding with
iptables MASQUERADE, and dropping every connection that did not start inside the home. The public
network even routes each home's private range to its router, so the firewall alone keeps
connections out. So a home can dial out, nothing can dial into a home, and two homes cannot dial
each other: `verify` checks
those three facts with real TCP connections and raises when the bed lets anything through.
Every name starts with a prefix made of the process id; `destroy` removes exactly those.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
from typing import Any

from tests.harness import processes

PUBLIC_NET = "10.77.0"
_LISTEN = ("import socket,sys\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
           "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(); print('listening', flush=True)\n"
           "while True: c, a = s.accept(); print(a[0], flush=True); c.close()")
_DIAL = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()"
         "; print('open')\nexcept OSError as e: print('closed', e)")
_PROBE_PORT = 47999


class NatBedError(Exception):
    """The bed cannot be built here, or lets through what a NAT must not."""


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise NatBedError("network namespaces and iptables need root")
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        raise NatBedError(f"missing command(s) {', '.join(missing)}: install iproute2 and iptables")


def _run(*args: str) -> str:
    done = subprocess.run(list(args), check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise NatBedError(f"`{' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


class NatBed:
    def __init__(self, publics: int = 2, homes: int = 3) -> None:
        self.publics, self.homes = publics, homes
        self.prefix = f"nb{os.getpid() % 100000}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []  # type: ignore[type-arg]

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def address(self, name: str) -> str:
        kind, index = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")):])
        if kind == "pub":
            return f"{PUBLIC_NET}.{10 + index}"
        if kind == "home":
            return f"192.168.{index}.2"
        if kind == "router":
            return f"{PUBLIC_NET}.{100 + index}"
        raise ValueError(f"no host {name!r} in the bed")

    def _netns(self, name: str) -> None:
        _run("ip", "netns", "add", self.ns(name))
        self.namespaces.append(self.ns(name))
        self._in(name, "ip", "link", "set", "lo", "up")

    def _in(self, name: str, *args: str) -> str:
        return _run("ip", "netns", "exec", self.ns(name), *args)

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        """A veth pair from namespace `a` (interface `a_if`) to `b` (`b_if`), both up."""
        tmp_a, tmp_b = f"{self.prefix}a{len(self.namespaces)}", f"{self.prefix}b{len(self.namespaces)}"
        _run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _run("ip", "link", "set", tmp_a, "netns", self.ns(a))
        _run("ip", "link", "set", tmp_b, "netns", self.ns(b))
        self._in(a, "ip", "link", "set", tmp_a, "name", a_if)
        self._in(b, "ip", "link", "set", tmp_b, "name", b_if)
        self._in(a, "ip", "link", "set", a_if, "up")
        self._in(b, "ip", "link", "set", b_if, "up")

    def create(self) -> NatBed:
        check_prerequisites()
        atexit.register(self.destroy)
        try:
            self._netns("wan")
            self._in("wan", "ip", "link", "add", "br0", "type", "bridge")
            self._in("wan", "ip", "link", "set", "br0", "up")
            for i in range(self.publics):
                self._netns(f"pub{i}")
                self._veth(f"pub{i}", "eth0", "wan", f"p{i}")
                self._in("wan", "ip", "link", "set", f"p{i}", "master", "br0")
                self._in(f"pub{i}", "ip", "addr", "add", f"{self.address(f'pub{i}')}/24", "dev", "eth0")
            for j in range(1, self.homes + 1):
                router, home = f"router{j}", f"home{j}"
                self._netns(router)
                self._netns(home)
                self._veth(router, "wan0", "wan", f"r{j}")
                self._in("wan", "ip", "link", "set", f"r{j}", "master", "br0")
                self._in(router, "ip", "addr", "add", f"{self.address(router)}/24", "dev", "wan0")
                self._veth(router, "lan0", home, "eth0")
                self._in(router, "ip", "addr", "add", f"192.168.{j}.1/24", "dev", "lan0")
                self._in(home, "ip", "addr", "add", f"{self.address(home)}/24", "dev", "eth0")
                self._in(home, "ip", "route", "add", "default", "via", f"192.168.{j}.1")
                self._in(router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
                self._in(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE")
                self._in(router, "iptables", "-A", "FORWARD", "-i", "wan0", "-m", "conntrack", "--ctstate",
                         "ESTABLISHED,RELATED", "-j", "ACCEPT")
                self._in(router, "iptables", "-A", "FORWARD", "-i", "wan0", "-j", "DROP")
            # the worst case for a NAT: the public network routes each home's private range to its
            # router, so only the router's firewall keeps connections out (checked in `verify`)
            for j in range(1, self.homes + 1):
                for host in [f"pub{i}" for i in range(self.publics)] + [f"router{k}" for k in range(1, self.homes + 1)
                                                                         if k != j]:
                    self._in(host, "ip", "route", "add", f"192.168.{j}.0/24", "via", self.address(f"router{j}"))
            self.verify()
        except BaseException:
            self.destroy()
            raise
        return self

    def forward(self, home: int, port: int) -> str:
        """Forward TCP `port` of router `home`'s public address to the same port of its home host
        (what a volunteer does in their router's settings); returns the public HOST:PORT."""
        router, inside = f"router{home}", self.address(f"home{home}")
        self._in(router, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan0", "-p", "tcp", "--dport", str(port),
                 "-j", "DNAT", "--to-destination", f"{inside}:{port}")
        self._in(router, "iptables", "-I", "FORWARD", "1", "-i", "wan0", "-p", "tcp", "-d", inside, "--dport",
                 str(port), "-j", "ACCEPT")
        return f"{self.address(router)}:{port}"

    def popen(self, name: str, args: list[str], **options: Any) -> subprocess.Popen:  # type: ignore[type-arg]
        """Start `args` inside host `name`'s namespace, in a session of its own (reaped by `destroy`)."""
        proc = processes.start(["ip", "netns", "exec", self.ns(name), *args], **options)
        self.procs.append(proc)
        return proc

    def dial(self, source: str, target_address: str, port: int) -> bool:
        out = self._in(source, sys.executable, "-c", _DIAL, target_address, str(port))
        return out.startswith("open")

    def verify(self) -> None:
        """A home dials out (and is seen as its router), nothing dials into a home, homes cannot
        dial each other: each checked with a real connection, all at once, or NatBedError."""
        homes = [f"home{j}" for j in range(1, self.homes + 1)]
        listeners = {}
        for host in ("pub0", *homes):
            proc = self.popen(host, [sys.executable, "-c", _LISTEN, str(_PROBE_PORT)], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "listening":
                raise NatBedError(f"a probe could not listen in {host}")
            listeners[host] = proc
        # (from, to, its address, whether a NAT lets it through)
        checks = [(home, "pub0", self.address("pub0"), True) for home in homes]
        for j, home in enumerate(homes, start=1):
            checks += [("pub0", home, target, False) for target in (self.address(home), self.address(f"router{j}"))]
            checks += [(other, home, target, False) for other in homes if other != home
                       for target in (self.address(home), self.address(f"router{j}"))]
        try:
            dials = [(check, subprocess.Popen(["ip", "netns", "exec", self.ns(check[0]), sys.executable, "-c", _DIAL,
                                               check[2], str(_PROBE_PORT)], stdout=subprocess.PIPE, text=True))
                     for check in checks]
            for (source, target, address, expected), proc in dials:
                opened = proc.communicate(timeout=30)[0].startswith("open")
                if opened != expected:
                    what = "cannot dial out to" if expected else "dialled into"
                    raise NatBedError(f"{source} {what} {target} at {address}: the bed is not a home NAT")
            seen = {listeners["pub0"].stdout.readline().strip() for _ in homes}
            routers = {self.address(f"router{j}") for j in range(1, self.homes + 1)}
            if seen != routers:
                raise NatBedError(f"pub0 saw the homes as {sorted(seen)}, not as their routers {sorted(routers)}")
        finally:
            for proc in listeners.values():
                processes.reap(proc)

    def destroy(self) -> None:
        for proc in self.procs:
            processes.reap(proc)
        self.procs.clear()
        for namespace in reversed(self.namespaces):
            with contextlib.suppress(NatBedError):
                _run("ip", "netns", "delete", namespace)
        self.namespaces.clear()
