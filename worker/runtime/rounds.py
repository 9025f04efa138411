"""When our stage's replica leads an averaging round, and what it does with every round's outcome.

Every replica of a stage, the first too, answers the rounds other replicas lead (a
`SyncFollower`). The replica that leads the stage's rounds (worker.replicas.sync_round: the
lowest peer id, or the next where that one starts none: worker.replicas.leadership) starts one
when `round_due` says, spaced by `round_gap` (worker.runtime.policy), and every replica that took
part ends the round on the same anchor: a DiLoCo outer step on the replicas' compressed
pseudo-gradients (worker.replicas.diloco). Rounds run beside the training: a replica only holds
its lock briefly, twice. A leader that finds a follower on a newer anchor than its own was left
behind (it stalled, or was away) and catches up: it takes the stage's anchor from that follower.
State bytes are counted as kind "state".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P

from protos import swarmtrain_pb2 as pb
from worker.pipeline import Replica, StageClient, StageExecutor
from worker.pipeline.admission import Admission
from worker.pipeline.pacing import Pacer
from worker.replicas import LeaderWatch, RoundResult, SyncFollower, lead_round
from worker.runtime.local_stage import LocalStage
from worker.runtime.policy import EARLY_ROUNDS, round_due, round_gap, stage_key
from worker.runtime.state_download import StateSource
from worker.runtime.swarm_view import SwarmView
from worker.runtime.traffic import TrafficMeter
from worker.telemetry.counters import CounterBook
from worker.telemetry.trace import Trace

Log = Callable[[str], None]

SYNC_POLL_S = 0.1  # how often a stage looks whether an averaging round is due


@dataclass
class RoundPacing:
    """What this worker's rounds learned, kept across its roles: when it may lead the next one, how
    many it led (after the first, the next one's time is measured), and whether it said how often
    rounds come."""

    next_round_at: float = 0.0
    rounds_led: int = 0
    said: bool = False


@dataclass(frozen=True)
class RoundLinks:
    """The worker's link, as rounds use it: its upload rate (unknown: None) and the bulk pacer."""

    bytes_per_s: float | None = None
    bulk: Pacer | None = None


class RoundScheduler:
    """Our stage's rounds for one role: leads them when due, follows the others', catches up."""

    def __init__(self, local: LocalStage, assignment: pb.Assignment, *, p2p: P2P, run_id: str,
                 client: StageClient, view: SwarmView, states: StateSource, admission: Admission,
                 counters: CounterBook, meter: TrafficMeter, trace: Trace, log: Log, pacing: RoundPacing,
                 links: RoundLinks, executor: Callable[[], StageExecutor | None],
                 takeover_floor_s: float, withhold_s: float = 0.0) -> None:
        self.local, self.assignment, self.index = local, assignment, assignment.stage_index
        self.key = stage_key(run_id, assignment.stage_index, assignment.layer_start, assignment.layer_end,
                             assignment.generation)
        self.client, self.view, self.states, self.counters, self.meter = client, view, states, counters, meter
        self.trace, self.log, self.pacing, self.links, self.executor = trace, log, pacing, links, executor
        self.period = max(1, assignment.sync_period_steps)  # changes in place (adjust)
        self.watch = LeaderWatch(p2p.peer_id.to_base58(), floor_s=takeover_floor_s)  # who leads our rounds
        self.standing_in = False  # we lead because every lower replica was passed over
        self.withheld_until = time.monotonic() + withhold_s  # worker --withhold-rounds: resilience tests only
        self.follower = SyncFollower(p2p, self.key, local.module, local.sync, executor, lambda: local.steps,
                                     self._followed, admits=admission.admits, on_refused=counters.report_peer,
                                     pacer=links.bulk, follows=self._follows)

    async def start(self) -> None:
        await self.follower.start()

    async def stop(self) -> None:
        await self.follower.stop()

    def adjust(self, assignment: pb.Assignment) -> None:
        self.assignment, self.period = assignment, max(1, assignment.sync_period_steps)

    async def run(self) -> None:
        """Start the stage's averaging rounds when due (only its leader does), beside its driving or
        serving: neither waits on the network for a round, only for the lock's two short holds."""
        synced_at = 0
        started, first_steps = 0.0, None  # when our stage first stepped, and its step count then
        while True:
            await asyncio.sleep(SYNC_POLL_S)
            running = self.executor()
            if running is None:
                continue
            steps = running.stats.steps
            if steps < synced_at:  # a new executor (a driver rebuilt): count from its start
                synced_at = 0
            if steps > 0 and (first_steps is None or steps < first_steps):
                started, first_steps = time.monotonic(), steps
                self.watch.restart()  # no round can come before our stage steps: wait from now
            if first_steps is None:
                continue
            pacing, now = self.pacing, time.monotonic()
            # self.period, not the assignment's: it may change in place
            if round_due(steps - synced_at, self.period, pacing.rounds_led, now, pacing.next_round_at):
                synced_at = steps
                step_s = (time.monotonic() - started) / max(1, steps - first_steps)
                await self._round(running, step_s)

    async def _round(self, executor: StageExecutor, step_s: float) -> None:
        """Lead an averaging round if this replica leads its stage's rounds; the others follow.
        `step_s`: our seconds per step, which with the period sets how often rounds come."""
        if time.monotonic() < self.pacing.next_round_at:
            return
        replicas = (await self.view.stage_replicas(self.index, self.local.span)).replicas
        local = self.local
        if not replicas:  # alone: our parameters are the stage's anchor
            await executor.exclusive(lambda: local.sync.adopt(_detached(local.module)))
            return
        followers = self._followers(replicas, step_s)
        follower = self.follower
        if not followers or follower.holding:  # never lead and follow at once
            return
        client = self.client
        sent_before = client.stats.bytes_out
        follower.leading = True
        try:
            result = await lead_round(client, followers, self.key, local.module, executor, local.sync,
                                      pacer=self.links.bulk)
        finally:
            follower.leading = False
        if result.newer:
            await self._catch_up(result.newer, executor)
        pacing = self.pacing
        pacing.rounds_led += 1
        pacing.next_round_at = time.monotonic() + round_gap(
            result.seconds, result.bytes_in + client.stats.bytes_out - sent_before,
            self.links.bytes_per_s, early=pacing.rounds_led <= EARLY_ROUNDS)
        self.meter.state(received=result.bytes_in)
        self.meter.state(sent=client.stats.bytes_out - sent_before)
        self._done(result)

    async def _catch_up(self, peer: str, executor: StageExecutor) -> None:
        """Our anchor is older than `peer`'s: the stage averaged without us (we stalled, or were
        away). Take the stage's anchor from it, as a joining replica does; what we trained on the
        stale one is dropped."""
        known = self.view.known_replicas(self.index, self.local.span)
        replica = next((r for r in known.replicas if r.peer_id.to_base58() == peer), None)
        if replica is None:
            return
        try:
            state = await self.states.fetch(self.local, self.assignment, replica)
        except Exception as err:  # noqa: BLE001 - any failure: the next round finds us behind again
            self.log(f"stage {self.index}: catching up with peer {peer[-8:]} failed "
                     f"({type(err).__name__}); trying again at the next round")
            return

        def adopt() -> bool:
            if state.round <= self.local.sync.round:  # a round brought us there meanwhile
                return False
            self.local.take_anchor(state)
            return True
        if await executor.exclusive(adopt):
            self.meter.state(received=state.wire_bytes)
            self.log(f"stage {self.index}: behind the stage's averaging; took its anchor "
                     f"(round {state.round}) from peer {peer[-8:]}")
            self.trace.write("catch_up", stage=self.index, round=state.round, peer=peer)

    def _follows(self, leader: str) -> bool:
        """Whether to answer `leader`'s begin (worker.replicas.leadership); on the loop."""
        return self.watch.accepts(leader, self.view.known_replicas(self.index, self.local.span).ids)

    def _followers(self, replicas: list[Replica], step_s: float) -> list[Replica]:
        """The replicas we lead this round among; [] where another replica leads (or where nobody is
        left above us). A lower replica that started no round for long is passed over (leadership)."""
        watch, index = self.watch, self.index
        ids = [r.peer_id.to_base58() for r in replicas]
        silence = watch.silence()
        silent = watch.silent_leader(ids, self.period * step_s)
        if silent is not None:
            self.log(f"stage {index}: replica {silent[-8:]} started no averaging round for "
                     f"{silence:.0f}s; passing it over")
            self.trace.write("leadership", stage=index, change="passed_over", peer=silent,
                             silence_s=round(silence, 3))
        above = watch.followers(ids)
        withholding = time.monotonic() < self.withheld_until
        standing_in = bool(above) and bool(watch.passed) and not withholding
        if standing_in != self.standing_in:
            self.standing_in = standing_in
            if standing_in:
                self.log(f"stage {index}: this replica leads its averaging rounds, in place of "
                         f"{len(watch.passed)} silent replica(s)")
                self.trace.write("leadership", stage=index, change="standing_in", silent=len(watch.passed))
            elif above is None:
                self.log(f"stage {index}: a lower replica leads the averaging rounds again")
                self.trace.write("leadership", stage=index, change="lower_leads")
        if above is None or withholding:
            return []
        chosen = set(above)
        return [r for r, i in zip(replicas, ids, strict=True) if i in chosen]

    def _followed(self, result: RoundResult) -> None:
        """A round another replica led has ended here (on the loop)."""
        if not result.refused:
            self.watch.heard()
        self._done(result)

    def _done(self, result: RoundResult) -> None:
        index = self.index
        self.trace.write("sync", stage=index, round=result.round_id, leader=result.leader,
                         step=self.local.steps, participants=result.participants, agreed=result.agreed,
                         digest=result.digest, seconds=round(result.seconds, 4),
                         **({"problems": result.problems} if result.problems else {}),
                         **({"outliers": result.outliers} if result.outliers else {}),
                         **({"refused": result.refused} if result.refused else {}))
        for peer in result.outliers:  # a faulty or lying replica: its update was clipped, not averaged
            self.log(f"stage {index}: replica {peer[-8:]} sent an outlying pseudo-gradient; clipped")
            if peer != "self":
                self.counters.report_peer(peer, "outlier")
        if result.refused and not result.leader:  # a lying leader's outcome, refused (and reported)
            self.log(f"stage {index}: {result.problems[0]}")
            return
        if result.refused:  # followers judged this replica's outcome implausible (problems say why)
            self.log(f"stage {index}: {result.refused} replica(s) refused this round's outcome")
        if (result.agreed > 1 or not result.leader) and not self.pacing.said:
            self.pacing.said = True
            role = "led" if result.leader else "took part in"
            self.log(f"stage {index} {role} an averaging round in {result.seconds:.2f}s; "
                     f"every {self.period} step(s) from now on")


def _detached(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in module.parameters()]
