"""The coordinator's dial-back of a worker's announced addresses, and what a volunteer is told."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

from coordinator.api.reachability import dial_back, probe_targets
from protos import swarmtrain_pb2 as pb
from worker.app.control_client import unreachable_advice

ROOT = Path(__file__).resolve().parents[2]
PEER = "QmRj4Qx58aQ9EWzDQc1bYYegE5rr3qgiZfGrNg4zZ6yydB"


def test_only_the_joiners_own_address_is_dialled_at_the_ports_it_announced() -> None:
    announced = [f"/ip4/192.168.1.2/tcp/4001/p2p/{PEER}", f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}",
                 "/ip6/::1/tcp/4002", "/ip4/10.0.0.1/udp/4003/quic", "/dns4/example.com/tcp/80",
                 "/ip4/169.254.169.254/tcp/4004", "/ip4/10.0.0.1/tcp/99999"]
    # seen as its router: that address, at the worker's ports; never the hosts it names
    assert probe_targets(announced, "203.0.113.9") == [("203.0.113.9", 4001), ("203.0.113.9", 4002),
                                                       ("203.0.113.9", 4004)]
    assert probe_targets(announced, "::ffff:203.0.113.9")[0] == ("203.0.113.9", 4001)  # IPv4 over IPv6
    assert probe_targets(announced, "unix:/tmp/sock") == []
    assert probe_targets([f"/ip4/1.2.3.4/tcp/{p}" for p in range(1, 30)], "203.0.113.9")[-1] == ("203.0.113.9", 8)


def test_a_listening_address_is_direct_and_a_closed_one_unreachable() -> None:
    async def run() -> tuple[int, int, int]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            closed = spare.getsockname()[1]  # bound, never listening: refused
            async with server:
                return (await dial_back([f"/ip4/10.9.9.9/tcp/{closed}", f"/ip4/10.9.9.9/tcp/{port}"], "127.0.0.1"),
                        await dial_back([f"/ip4/10.9.9.9/tcp/{closed}"], "127.0.0.1"),
                        await dial_back([], "127.0.0.1"))
    assert asyncio.run(run()) == (pb.REACHABILITY_DIRECT, pb.REACHABILITY_UNREACHABLE, pb.REACHABILITY_UNSPECIFIED)


def test_the_advice_names_the_addresses_and_what_to_do() -> None:
    line = unreachable_advice([f"/ip4/192.168.1.2/tcp/40411/p2p/{PEER}"])
    assert line.startswith("warning: the coordinator could not connect to this worker (/ip4/192.168.1.2/tcp/40411")
    assert "Forward a TCP port" in line and "--public-addr YOUR_PUBLIC_IP:31330" in line and "\n" not in line


def test_a_bad_public_addr_is_one_line() -> None:
    for value, expected in (("nope", "expected HOST:PORT"), ("example.com:31330", "HOST must be an IP address")):
        done = subprocess.run([sys.executable, "-m", "worker.app.cli", "--coordinator", "127.0.0.1:1",
                               "--public-addr", value], capture_output=True, text=True, timeout=60, check=False,
                              cwd=ROOT)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr


def test_the_planner_puts_an_unreachable_worker_on_stage_zero_only(tmp_path: Path) -> None:
    from tests.harness.swarm_state import Clock, make_swarm, profile

    swarm = make_swarm(tmp_path, Clock())
    ids = [swarm.join(pb.JoinRequest(profile=profile()), "ipv4:203.0.113.9:1")[0].worker_id for _ in range(4)]
    assert swarm.plan is not None and swarm.plan.num_stages == 2  # 50 MiB each: tiny takes two stages
    later = [w for w in ids if swarm.registry.workers[w].stage_index == 1]
    assert later
    for worker_id in later:  # the dial-back found these behind closed routers
        swarm.reachability[worker_id] = pb.REACHABILITY_UNREACHABLE
    swarm.replan()
    stages = {w: swarm.registry.workers[w].stage_index for w in ids}
    assert all(stages[w] in (0, -1) for w in later), stages
    assert swarm.plan is not None and all(s.active_workers for s in swarm_view_stages(swarm)), stages


def swarm_view_stages(swarm):
    from coordinator.api.service import swarm_view

    return swarm_view(swarm).stages


def test_every_planner_keeps_unreachable_workers_off_later_stages() -> None:
    from configs.link import Link
    from configs.loader import load_config
    from configs.profile import model_profile
    from coordinator.planning.planner import WorkerCapacity, plan

    config = load_config("tiny")
    profile_ = model_profile(config.model, config.training.precision, config.training,
                             overlap_steps=config.coordinator.compression.overlap_steps)
    fleet = [WorkerCapacity(f"w{i}", 5e12, 50 * 2**20, Link.from_mbps(1000), device="cpu", reachable=i % 2 == 0)
             for i in range(12)]  # 50 MiB CPU workers: tiny takes two stages
    for size in (12, 4):  # 12: the heuristic search; 4: the exact planner
        made = plan(profile_, fleet[:size])
        assert made is not None and made.num_stages == 2, made
        assert all(made.stage_of[w.worker_id] in (0, -1) for w in fleet[:size] if not w.reachable), made.stage_of
