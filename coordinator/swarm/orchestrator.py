"""The coordinator's swarm, without gRPC: admits workers, keeps the plan, answers heartbeats.

Every decision is a verdict of a pure module beside this one (admission, roster, trust, replanning,
assignments, checkpoint_schedule); `Swarm` applies them: registry writes, the plan's version
(commit.PlanLedger), the operator's log lines. Refusals are raised as `InvalidRequest`s carrying the
status code that coordinator/api/service.py answers with.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence

from configs.catalog import load_catalog
from configs.profile import model_profile
from configs.schema import RunConfig
from configs.version import SOFTWARE_VERSION
from coordinator.costs.meter import CostMeter, SwarmRates, worker_rates
from coordinator.planning.compression_policy import WorkerCompression, heaviest_activation_ratio
from coordinator.planning.planner import Plan, WorkerCapacity, restored_plan
from coordinator.storage.checkpoints import Checkpoint, upload_limit
from coordinator.storage.join_tokens import JoinToken
from coordinator.storage.registry import ACTIVE, EXPELLED, LEFT, Registry, WorkerRecord, new_record
from coordinator.swarm import admission, assignments, roster
from coordinator.swarm.budget import TokenBudget
from coordinator.swarm.checkpointing import Checkpointing
from coordinator.swarm.commit import PlanLedger
from coordinator.swarm.data_handout import DataHandout
from coordinator.swarm.refusal import Refusal
from coordinator.swarm.replanning import compute, diff, full_search_due, sparing_state
from coordinator.swarm.rollback import Generation
from coordinator.swarm.stats import MeasuredRates, PeerReportTally, ServingState, Throughput, add_traffic
from coordinator.swarm.strikes import StrikeBook
from protos import swarmtrain_pb2 as pb

REPORTS_TO_LOG = 10  # a peer refused this often is named in the operator's log, once


class Swarm:
    def __init__(self, config: RunConfig, registry: Registry, clock: Callable[[], float] = time.time) -> None:
        self.config, self.registry, self.clock = config, registry, clock
        self.profile = model_profile(config.model, config.training.precision, config.training,  # whole peaks
                                     overlap_steps=config.coordinator.compression.overlap_steps)
        self.config_hash = config.fingerprint()
        self.policy = config.coordinator.compression
        self._activation_ratio = heaviest_activation_ratio(self.policy)
        self.ledger = PlanLedger(registry)
        self.rates = MeasuredRates()  # these five: what heartbeats report, in memory (swarm/stats.py)
        self.serving = ServingState()
        self.reachability: dict[str, int] = {}  # worker -> pb.Reachability: the api layer's dial-back at Join
        self.reports = PeerReportTally()
        self.traffic: dict[int, pb.TrafficCounter] = {}  # bytes by kind since this process started
        self.throughput = Throughput()
        self._issued: dict[str, WorkerCompression] = {}  # worker -> the compression its assignment carries
        self._reissued_at: dict[str, float] = {}  # worker -> when its compression was last re-issued
        self._profiles: dict[str, pb.WorkerProfile] = {}  # parsed once, not on every re-plan
        self.strikes = StrikeBook(config.coordinator.ban_after_reports, config.coordinator.heartbeat_interval_s / 2,
                                  clock)
        self.peers = roster.PeerBook()
        for record in registry.workers.values():
            self.peers.claim(self.worker_profile(record).peer_id, record)
        self.tokens: dict[str, JoinToken] = {}  # managed join tokens by hash
        self._tokens_read_at = float("-inf")
        self._revoked_seen: set[str] = set()
        self.catalog = load_catalog()
        self.cost = CostMeter(config.metrics.energy_usd_per_kwh)
        # when a fresh plan last replaced the kept one; counted from the start, because the rates
        # measured in a swarm's first minutes (warm-up, state downloads, joins) are mostly noise
        self._reshuffled_at = clock()
        self.checkpointing = Checkpointing(config, registry, clock)
        self.checkpoints = self.checkpointing.store
        self.budget = TokenBudget.for_run(config, driven=registry.progress.trained_tokens)
        self.data = DataHandout.for_run(config, registry.connection)
        loaded = registry.load_plan()
        if loaded:
            version, body = loaded
            split = tuple(body.get("boundaries") or ())
            capacities = [self.capacity(r) for r in registry.active()]
            self.ledger.restore(version, restored_plan(self.profile, capacities, split, body["stage_of"]) if split
                                else None, body.get("note", ""), Generation.from_body(body), registry.active())
        self.restart_clocks()
        self.refresh_tokens()  # tokens revoked while the coordinator was down

    @property
    def plan(self) -> Plan | None:
        return self.ledger.plan

    @property
    def plan_version(self) -> int:
        return self.ledger.version

    @property
    def note(self) -> str:
        return self.ledger.note

    def restart_clocks(self) -> None:
        """The coordinator was away: its workers could not beat. Start their clocks afresh (the
        server calls this again once it listens: starting up may take longer than the timeout)."""
        now = self.clock()
        for record in self.registry.active():
            self.registry.record_heartbeat(roster.restarted_clock(record, now))

    # ---- RPC entry points --------------------------------------------------------------

    def join(self, request: pb.JoinRequest, address: str) -> tuple[WorkerRecord, str]:
        token_name = self._admitting_token(request)
        existing = None
        if request.worker_id:
            existing = self._authenticated(request.worker_id, request.session_token)
            _refuse(admission.expelled_refusal(existing))
        _refuse(admission.peer_refusal(request.profile.peer_id, request.worker_id, self.peers.owner,
                                       self.peers.banned, self.registry.workers))
        self.accrue_cost()  # the time so far at the rates before this worker
        now, lease = self.clock(), self.config.coordinator.lease_s
        profile_bytes = request.profile.SerializeToString(deterministic=True)
        if existing is not None:
            token = request.session_token
            self.peers.release(self.worker_profile(existing).peer_id, existing.worker_id)
            record = roster.rejoined(existing, profile_bytes, now, lease, address, token_name)
        else:
            token = secrets.token_urlsafe(24)
            worker_id = f"w-{secrets.token_hex(6)}"
            record = new_record(worker_id, token, profile_bytes, now, lease, address, token_name)
        self.registry.upsert_worker(record)
        self._profiles[record.worker_id] = request.profile
        self.peers.claim(request.profile.peer_id, record)
        self.replan()
        return self.registry.workers[record.worker_id], token

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        record = self._authenticated(request.worker_id, request.session_token)
        _refuse(admission.heartbeat_refusal(record))
        now, c = self.clock(), request.counters
        self.rates.note(record.worker_id, c)
        add_traffic(self.traffic, c.traffic)
        self._note_reports(record.worker_id, c.reports)
        acknowledged = self.data.note(record.worker_id, request.data_progress)
        record = self.registry.workers[record.worker_id]  # a ban may have re-planned it meanwhile
        self.serving.note(record.worker_id, request.plan_version, c.serves_state)
        record = roster.renewed(record, now, self.config.coordinator.lease_s, c.tokens,
                                self.rates.rate.get(record.worker_id, record.tokens_per_second), c.local_step)
        self.registry.record_heartbeat(record)
        current = request.plan_version >= self.ledger.generation.since_version  # not training a rolled-back one
        if current and self.plan is not None and record.stage_index == self.plan.num_stages - 1:
            # every token crosses every stage: count it once, where the loss is computed
            self.registry.add_progress(c.tokens, c.loss_sum, c.loss_count)
        if current and record.stage_index == 0:  # only stage 0 starts steps: the budget counts its tokens
            self.budget.note_driven(record.worker_id, c.tokens)
        response = pb.HeartbeatResponse(instruction=pb.INSTRUCTION_CONTINUE, data_acknowledged=acknowledged,
                                        lease_expires_unix=record.lease_expires_unix)
        if final := self.final_checkpoint():
            response.instruction = pb.INSTRUCTION_COMPLETE
            response.status = self.checkpointing.completion(final, self.registry.progress.trained_tokens)
        elif record.stage_index < 0:
            response.status = self.note or "waiting for a stage"
        elif request.plan_version < record.assigned_version:
            response.instruction = pb.INSTRUCTION_REASSIGN
            response.assignment.CopyFrom(self.assignment_for(record))
        else:  # runs its current assignment: it may be asked for its stage's checkpoint part
            wanted = self.checkpoints.request_for(record.worker_id, record.stage_index)
            if wanted is not None:
                response.checkpoint.CopyFrom(wanted)
            if record.stage_index == 0:  # a grant that lasts a lease: drivers train on through an outage
                rate = self.rates.rate.get(record.worker_id, record.tokens_per_second)
                response.grant.tokens_left = self.budget.grant(record.worker_id, rate)
                self.data.fill(response, record.worker_id)
        return response

    def leave(self, request: pb.LeaveRequest) -> None:
        record = self._authenticated(request.worker_id, request.session_token)
        self.accrue_cost()
        if record.state == LEFT or record.state in EXPELLED:
            return  # a retried Leave is not an error; an expelled worker stays expelled
        self.registry.upsert_worker(roster.left(record))
        self.replan()

    def authorize_checkpoint_transfer(self, worker_id: str, session_token: str, start: int, end: int) -> int:
        """Authenticate a worker that uploads or downloads checkpoint files of layers [start, end);
        the most bytes such a file may take."""
        record = self._authenticated(worker_id, session_token)
        _refuse(admission.transfer_refusal(record, start, end, self.profile.n_layer))
        return upload_limit(self.profile.stage_cost(start, end).params)

    # ---- peer reports and bans ---------------------------------------------------------

    def _note_reports(self, reporter: str, reports: Sequence[pb.PeerReport]) -> None:
        """Peers a worker refused messages from: counted by reason, and by the peer reported;
        credible reports strike the reported worker, and enough strikes ban it."""
        for report in reports:
            self._strike(reporter, report.peer_id, report.reason)
            before = self.reports.add(report)
            if before < REPORTS_TO_LOG <= before + report.count:
                who = next((r.worker_id for r in self.registry.workers.values()
                            if self.worker_profile(r).peer_id == report.peer_id),
                           "not a worker of this swarm")
                print(f"warning: peer {report.peer_id} ({who}) reported {before + report.count} times, "
                      f"last by {reporter}: {report.reason}", flush=True)

    def _strike(self, reporter_id: str, peer_id: str, reason: str) -> None:
        target = self.peers.owner_of(peer_id, self.registry.workers)
        verdict = self.strikes.strike(self.registry.workers[reporter_id], target, reason, self.registry.workers)
        if verdict and target is not None:
            self._ban(target, verdict)

    def _ban(self, record: WorkerRecord, verdict: str) -> None:
        """Out of the registry's active workers (so out of GetSwarm's and the data plane's), for good."""
        self.accrue_cost()
        banned = roster.banned(record, verdict)
        self.registry.upsert_worker(banned)
        self.strikes.forget(record.worker_id)
        peer_id = self.worker_profile(record).peer_id
        self.peers.claim(peer_id, banned)
        print(f"banned worker {record.worker_id} (peer {peer_id}): {verdict}", flush=True)
        self.replan()

    # ---- housekeeping ------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Mark workers silent for longer than the timeout as gone, and re-plan without them.
        Also re-reads the join tokens, so that a revocation takes effect."""
        self.refresh_tokens()
        self.accrue_cost()
        self.throughput.sample(self.clock(), self.registry.progress.trained_tokens)
        timeout = self.config.coordinator.heartbeat_timeout_s
        expired = roster.expired(self.registry.active(), self.clock(), timeout)
        if expired:
            self.registry.update_workers([roster.gone(w) for w in expired])
            self.replan()
        drivers = {r.worker_id for r in self.registry.active() if r.stage_index == 0}
        self.budget.release(drivers)
        self.data.release(drivers)
        self.checkpoint_tick()
        return [w.worker_id for w in expired]

    def checkpoint_tick(self) -> None:
        """Act on the checkpoint schedule; once the budget is trained, the final checkpoint is due."""
        if self.final_checkpoint() is not None:
            return
        trained = self.registry.progress.trained_tokens
        self.checkpointing.tick(self.plan, self.registry.active(), trained,
                                final_due=self.budget.reached and trained >= self.budget.total)
        self.data.snapshot(self.checkpoints.open)

    def final_checkpoint(self) -> Checkpoint | None:  # the one the run ended with; None while it trains
        return self.checkpointing.final(self.budget.total) if self.budget.reached else None

    def refresh_tokens(self) -> list[str]:
        """Re-read the managed join tokens; expel every worker admitted with one revoked since the
        last read. Returns the expelled workers' ids."""
        self.tokens = self.registry.tokens.by_hash()
        self._tokens_read_at = self.clock()
        revoked = {t.name for t in self.tokens.values() if t.revoked}
        fresh, self._revoked_seen = revoked - self._revoked_seen, revoked
        victims = admission.revoked_victims(self.registry.workers.values(), fresh) if fresh else []
        if not victims:
            return []
        self.accrue_cost()
        self.registry.update_workers([roster.revoked(r) for r in victims])
        for name in sorted({r.join_token_name for r in victims}):
            ids = sorted(r.worker_id for r in victims if r.join_token_name == name)
            print(f"join token {name} revoked: expelled {len(ids)} worker(s): {' '.join(ids)}", flush=True)
        self.replan()
        return [r.worker_id for r in victims]

    # ---- planning ----------------------------------------------------------------------

    def replan(self, *, full: bool | None = None, for_speed: bool = False) -> bool:
        """Re-plan (full search with hysteresis, or a cheap patch on large swarms) and commit what
        changed; True if any worker's assignment changed. `for_speed`: nothing joined or left, only
        measured rates moved. Those are noisy, so such a re-plan reshuffles at most every
        `replan_min_interval_s` (and patches otherwise). A complete run keeps its last plan."""
        if self.final_checkpoint() is not None:
            return False
        active, c = sorted(self.registry.active(), key=lambda r: r.worker_id), self.config.coordinator
        calm = for_speed and self.clock() - self._reshuffled_at < c.replan_min_interval_s
        workers = [self.capacity(r) for r in active]
        verdict = compute(self.profile, workers, self.plan,
                          full=full_search_due(self.plan, len(active)) if full is None else full,
                          min_gain=math.inf if calm else c.replan_min_gain)
        verdict, rollback = sparing_state(self.profile, workers, self.plan, verdict, self.ledger.lost,
                                          trained_tokens=self.registry.progress.trained_tokens,
                                          generation=self.ledger.generation, newest=self.checkpoints.latest)
        if verdict.reshuffled:
            self._reshuffled_at = self.clock()
        change = diff(self.plan, verdict.plan, active)
        if self.ledger.commit(verdict, change, active, rollback):
            restarted = change.restarted if rollback is None else {w for w, s in change.stage_of.items() if s >= 0}
            for worker_id in restarted:  # a stage rebuilt serves nothing until it says so
                self.serving.restart(worker_id, self.plan_version)
        if rollback is not None:  # every stage starts again: so do the budget's count and the rest
            self.budget.rewind(rollback.to_tokens)
            self.data.rewind(rollback.checkpoint_id)
            self.throughput = Throughput()
            if self.checkpoints.open is not None:
                self.checkpoints.abandon("the swarm rolled back")
            print(rollback.line(self.ledger.generation.number), flush=True)
        return bool(change.reassigned) or rollback is not None

    def check_drift(self) -> bool:
        """The periodic full search: another plan only if it beats this one (measured rates included)
        by more than the hysteresis threshold; then `refresh_compression`."""
        moved = self.replan(full=True, for_speed=True)
        return self.refresh_compression() or moved

    def refresh_compression(self) -> bool:
        """Re-issue each assignment whose codecs or averaging period the policy, given the rate measured
        on the worker's stage, now chooses otherwise (when `assignments.recheck_due`). True if any."""
        if self.plan is None:
            return False
        now, interval = self.clock(), self.config.coordinator.replan_min_interval_s
        stale = [r for r in self.registry.active()
                 if assignments.recheck_due(self._issued.get(r.worker_id), r.stage_index,
                                            self.rates.measurements.get(r.worker_id, 0),
                                            self._reissued_at.get(r.worker_id), now, interval)
                 and self.compression_for(r) != self._issued[r.worker_id]]
        if not stale:
            return False
        self.ledger.reissue(stale)
        self._reissued_at.update((r.worker_id, now) for r in stale)
        return True

    def worker_profile(self, record: WorkerRecord) -> pb.WorkerProfile:
        if record.worker_id not in self._profiles:
            self._profiles[record.worker_id] = pb.WorkerProfile.FromString(record.profile)
        return self._profiles[record.worker_id]

    def achieved_flops(self, record: WorkerRecord) -> float:
        return assignments.achieved_flops(self.profile, self.plan, record.stage_index,
                                          self.rates.rate.get(record.worker_id),
                                          self.worker_profile(record).achieved_flops)

    def capacity(self, record: WorkerRecord) -> WorkerCapacity:
        return assignments.capacity(record.worker_id, record.stage_index, self.worker_profile(record),
                                    self.achieved_flops(record), self._activation_ratio,
                                    self.reachability.get(record.worker_id) != pb.REACHABILITY_UNREACHABLE)

    # ---- assignments -------------------------------------------------------------------

    def assignment_for(self, record: WorkerRecord) -> pb.Assignment:
        assert self.plan is not None and record.stage_index >= 0
        choice = self._issued[record.worker_id] = self.compression_for(record)
        stage0 = [r.worker_id for r in self.registry.active() if r.stage_index == 0]
        return assignments.assignment(
            self.plan, record.stage_index, record.worker_id, plan_version=record.assigned_version,
            choice=choice, stage0=stage0, run_id=self.config.coordinator.run_id, generation=self.ledger.generation.number,
            config_hash=self.config_hash, lease_expires_unix=record.lease_expires_unix)

    def compression_for(self, record: WorkerRecord) -> WorkerCompression:
        assert self.plan is not None
        return assignments.compression_for(self.policy, self.profile, self.config.training, self.plan,
                                           record.stage_index, self.worker_profile(record),
                                           self.achieved_flops(record))

    # ---- what the exporters read -------------------------------------------------------

    def serves_state(self, record: WorkerRecord) -> bool:
        """Whether the worker's stage state can be downloaded from it, per its last heartbeat."""
        return record.state == ACTIVE and self.serving.serves(record.worker_id)

    def swarm_rate(self) -> float:
        return self.plan.rate if self.plan else 0.0

    def live_rates(self) -> SwarmRates:
        """The active workers' summed $/h, board power and peak FLOP/s."""
        active = self.registry.active()
        return SwarmRates.of(worker_rates(self.worker_profile(r), self.catalog) for r in active)

    def accrue_cost(self) -> None:
        """Bill the time since the last call at the live swarm's rates (see coordinator.costs.meter)."""
        self.cost.accrue(self.clock(), self.live_rates())

    def measured_tokens_per_second(self) -> float:
        """Trained tokens per second over the last minute of sweeps; 0 before two sweeps."""
        return self.throughput.rate(self.clock(), self.registry.progress.trained_tokens)

    # ---- helpers -----------------------------------------------------------------------

    def _admitting_token(self, request: pb.JoinRequest) -> str:
        """Refuse a Join without a valid join token or with another release; returns the name of
        the managed token that admits it ('' for the config's token, or a swarm open to all)."""
        static, presented = self.config.coordinator.join_token, request.join_token
        if admission.token_reread_due(presented, static, self.tokens, self.clock(), self._tokens_read_at):
            self.refresh_tokens()  # a token just added by the CLI
        verdict = admission.token_verdict(presented, static, self.tokens)
        _refuse(verdict if isinstance(verdict, Refusal) else None)
        _refuse(admission.release_refusal(SOFTWARE_VERSION, request.profile.software_version))
        return verdict

    def _authenticated(self, worker_id: str, session_token: str) -> WorkerRecord:
        verdict = admission.authenticate(self.registry.workers, worker_id, session_token)
        _refuse(verdict if isinstance(verdict, Refusal) else None)
        return verdict


def _refuse(verdict: Refusal | None) -> None:
    if verdict is not None:
        raise verdict.error()
