"""The coordinator's decisions, without gRPC: who is in the swarm, what each worker serves.

The service (coordinator/service.py) validates requests and converts messages; this module
admits workers, keeps the plan, and answers heartbeats. Refusals are `InvalidRequest`s
carrying the status code to answer with.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from configs.catalog import load_catalog
from configs.profile import model_profile
from configs.schema import RunConfig
from configs.version import SOFTWARE_VERSION
from coordinator.compression_policy import WorkerCompression, choose_compression, heaviest_activation_ratio
from coordinator.cost_meter import CostMeter, SwarmRates, worker_rates
from coordinator.planner import InfeasiblePlanError, Plan, WorkerCapacity, evaluate, patch, replan
from coordinator.registry import ACTIVE, GONE, LEFT, Registry, WorkerRecord, hash_token, new_record
from coordinator.validation import InvalidRequest, same_release_line
from protos import swarmtrain_pb2 as pb

MEASURED_RATE_WEIGHT = 0.3  # EMA weight of the newest heartbeat's measured compute rate
# Up to this many workers every join/leave runs the full planner search (well under 0.1 s);
# above it, events patch the plan in one cheap pass and the search runs periodically.
FULL_REPLAN_MAX_WORKERS = 256


REPORTS_TO_LOG = 10  # a peer refused this often is named in the operator's log, once
RATE_WINDOW_S = 60.0  # the measured swarm throughput is averaged over about this long

class Swarm:
    def __init__(self, config: RunConfig, registry: Registry, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        self.profile = model_profile(config.model, config.training.precision)
        self.config_hash = config.fingerprint()
        self.policy = config.coordinator.compression
        self._activation_ratio = heaviest_activation_ratio(self.policy)
        self.plan: Plan | None = None
        self.plan_version = 0
        self.note = ""
        self._measured: dict[str, float] = {}  # worker -> measured compute tokens/s (EMA)
        self._profiles: dict[str, pb.WorkerProfile] = {}  # parsed once, not on every re-plan
        # bytes by kind the workers reported since this process started (kept in memory: a
        # restart resets them, as Prometheus counters may)
        self.traffic: dict[int, pb.TrafficCounter] = {}
        self.reports_by_reason: dict[str, int] = {}  # messages workers refused from other peers
        self.reports_by_peer: dict[str, int] = {}
        self.catalog = load_catalog()
        self.cost = CostMeter(config.metrics.energy_usd_per_kwh)
        self._progress_seen: deque[tuple[float, int]] = deque()  # (time, trained tokens) per sweep
        loaded = registry.load_plan()
        if loaded:
            self.plan_version, body = loaded
            self.note = body.get("note", "")
            if body.get("boundaries"):
                self.plan = self._plan_from(tuple(body["boundaries"]), body["stage_of"])
        self.restart_clocks()

    def restart_clocks(self) -> None:
        """The coordinator was away: its workers could not beat. Start their clocks afresh (the
        server calls this again once it listens: starting up may take longer than the timeout)."""
        now = self.clock()
        for record in self.registry.active():
            self.registry.record_heartbeat(replace(record, last_heartbeat_unix=now))

    # ---- RPC entry points --------------------------------------------------------------

    def join(self, request: pb.JoinRequest, address: str) -> tuple[WorkerRecord, str]:
        self._check_admission(request)
        self.accrue_cost()  # the time so far at the rates before this worker
        now = self.clock()
        lease = self.config.coordinator.lease_s
        profile_bytes = request.profile.SerializeToString(deterministic=True)
        if request.worker_id:
            existing = self._authenticate(request.worker_id, request.session_token)
            token = request.session_token
            record = replace(existing, profile=profile_bytes, state=ACTIVE, last_heartbeat_unix=now,
                             lease_expires_unix=now + lease, address=address)
        else:
            worker_id = f"w-{secrets.token_hex(6)}"
            token = secrets.token_urlsafe(24)
            record = new_record(worker_id, token, profile_bytes, now, lease, address)
        self.registry.upsert_worker(record)
        self._profiles[record.worker_id] = request.profile
        self.replan()
        return self.registry.workers[record.worker_id], token

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        record = self._authenticate(request.worker_id, request.session_token)
        if record.state != ACTIVE:
            why = "missed heartbeats" if record.state == GONE else "left"
            raise InvalidRequest(
                "FAILED_PRECONDITION", f"worker {record.worker_id} {why}: call Join with its id and token to return"
            )
        now = self.clock()
        c = request.counters
        self._note_measured_rate(record.worker_id, c)
        self._add_traffic(c.traffic)
        self._note_reports(record.worker_id, c.reports)
        record = replace(
            record,
            last_heartbeat_unix=now,
            lease_expires_unix=now + self.config.coordinator.lease_s,
            tokens_total=record.tokens_total + c.tokens,
            tokens_per_second=self._measured.get(record.worker_id, record.tokens_per_second),
            local_step=c.local_step,
        )
        self.registry.record_heartbeat(record)
        if self._is_last_stage(record):
            # every token crosses every stage: count it once, where the loss is computed
            self.registry.add_progress(c.tokens, c.loss_sum, c.loss_count)
        response = pb.HeartbeatResponse(
            instruction=pb.INSTRUCTION_CONTINUE, lease_expires_unix=record.lease_expires_unix
        )
        if record.stage_index < 0:
            response.status = self.note or "waiting for a stage"
        elif request.plan_version < record.assigned_version:
            response.instruction = pb.INSTRUCTION_REASSIGN
            response.assignment.CopyFrom(self.assignment_for(record))
        return response

    def _note_reports(self, reporter: str, reports: Sequence[pb.PeerReport]) -> None:
        """Peers a worker refused messages from: counted by reason, and by the peer reported."""
        for report in reports:
            self.reports_by_reason[report.reason] = self.reports_by_reason.get(report.reason, 0) + report.count
            before = self.reports_by_peer.get(report.peer_id, 0)
            self.reports_by_peer[report.peer_id] = before + report.count
            if before < REPORTS_TO_LOG <= before + report.count:
                who = next((r.worker_id for r in self.registry.workers.values()
                            if self.worker_profile(r).peer_id == report.peer_id), "not a worker of this swarm")
                print(f"warning: peer {report.peer_id} ({who}) reported {before + report.count} times, "
                      f"last by {reporter}: {report.reason}", flush=True)

    def _add_traffic(self, reported: Sequence[pb.TrafficCounter]) -> None:
        for counter in reported:
            total = self.traffic.setdefault(counter.kind, pb.TrafficCounter(kind=counter.kind))
            total.sent_bytes += counter.sent_bytes
            total.received_bytes += counter.received_bytes
            total.uncompressed_bytes += counter.uncompressed_bytes

    def leave(self, request: pb.LeaveRequest) -> None:
        record = self._authenticate(request.worker_id, request.session_token)
        self.accrue_cost()
        if record.state == LEFT:
            return  # a retried Leave is not an error
        self.registry.upsert_worker(replace(record, state=LEFT, stage_index=-1))
        self.replan()

    def live_rates(self) -> SwarmRates:
        """The active workers' summed $/h, board power and peak FLOP/s."""
        return SwarmRates.of(worker_rates(self.worker_profile(r), self.catalog) for r in self.registry.active())

    def accrue_cost(self) -> None:
        """Bill the time since the last call at the live swarm's rates (see coordinator.cost_meter)."""
        self.cost.accrue(self.clock(), self.live_rates())

    def measured_tokens_per_second(self) -> float:
        """Trained tokens per second over the last minute of sweeps; 0 before two sweeps."""
        if not self._progress_seen:
            return 0.0
        then, tokens = self._progress_seen[0]
        seconds = self.clock() - then
        return (self.registry.progress.trained_tokens - tokens) / seconds if seconds > 0 else 0.0

    def sweep(self) -> list[str]:
        """Mark workers silent for longer than the timeout as gone, and re-plan without them."""
        self.accrue_cost()
        now = self.clock()
        self._progress_seen.append((now, self.registry.progress.trained_tokens))
        while len(self._progress_seen) > 2 and now - self._progress_seen[1][0] >= RATE_WINDOW_S:
            self._progress_seen.popleft()
        expired = self.registry.expired(self.clock(), self.config.coordinator.heartbeat_timeout_s)
        if expired:
            self.registry.update_workers([replace(w, state=GONE, stage_index=-1) for w in expired])
            self.replan()
        return [w.worker_id for w in expired]

    # ---- planning ----------------------------------------------------------------------

    def worker_profile(self, record: WorkerRecord) -> pb.WorkerProfile:
        profile = self._profiles.get(record.worker_id)
        if profile is None:
            profile = self._profiles[record.worker_id] = pb.WorkerProfile.FromString(record.profile)
        return profile

    def capacity(self, record: WorkerRecord) -> WorkerCapacity:
        profile = self.worker_profile(record)
        flops = profile.achieved_flops
        measured = self._measured.get(record.worker_id)
        if measured and self.plan and 0 <= record.stage_index < self.plan.num_stages:
            # drift: trust what the worker really computes on its stage over its benchmark
            start, end = self._span(record.stage_index)
            flops = measured * self.profile.stage_cost(start, end).train_flops_per_token
        return WorkerCapacity(
            worker_id=record.worker_id,
            achieved_flops=flops,
            memory_bytes=profile.memory_bytes,
            upload_bps=profile.upload_bps,
            download_bps=profile.download_bps,
            activation_compression_ratio=self._activation_ratio,
            stage_index=record.stage_index,
        )

    def replan(self, *, full: bool | None = None) -> bool:
        """Re-plan (full search with hysteresis, or a cheap patch on large swarms); commit the
        plan and every changed assignment. True if any worker's assignment changed."""
        active = sorted(self.registry.active(), key=lambda r: r.worker_id)
        workers = [self.capacity(r) for r in active]
        if full is None:
            full = self.plan is None or len(active) <= FULL_REPLAN_MAX_WORKERS
        try:
            new_plan: Plan | None = None
            if not full and self.plan is not None:
                new_plan = patch(self.profile, workers, self.plan)
            if new_plan is None or new_plan.rate <= 0:
                new_plan = replan(self.profile, workers, self.plan, min_gain=self.config.coordinator.replan_min_gain)
            note = new_plan.note
        except InfeasiblePlanError as err:
            new_plan, note = None, str(err)
        old_bounds = self.plan.boundaries if self.plan else None
        new_bounds = new_plan.boundaries if new_plan else None
        new_stage = {r.worker_id: (new_plan.stage_of.get(r.worker_id, -1) if new_plan else -1) for r in active}
        changed = {
            r.worker_id
            for r in active
            if new_stage[r.worker_id] != r.stage_index or (new_stage[r.worker_id] >= 0 and new_bounds != old_bounds)
        }
        old_stage0 = {w for w, stage in self.plan.stage_of.items() if stage == 0} if self.plan else set()
        new_stage0 = {w for w, stage in new_stage.items() if stage == 0}
        if old_stage0 != new_stage0:
            changed |= new_stage0  # stage 0's data shards are numbered among its members
        old_members = dict(self.plan.stage_of) if self.plan else {}
        self.plan, self.note = new_plan, note
        if not changed and new_bounds == old_bounds and old_members == (dict(new_plan.stage_of) if new_plan else {}):
            return False  # nothing to record: same split, same members
        self.plan_version += 1
        moved_records = [
            replace(r, stage_index=new_stage[r.worker_id], assigned_version=self.plan_version)
            for r in active
            if r.worker_id in changed
        ]
        body = {
            "boundaries": list(new_bounds) if new_bounds else [],
            "stage_of": dict(new_plan.stage_of) if new_plan else {},
            "note": note,
        }
        self.registry.save_plan(self.plan_version, body, moved_records)
        return bool(changed)

    def check_drift(self) -> bool:
        """The periodic full search: adopts another plan only if it beats this one (measured
        rates included) by more than the hysteresis threshold."""
        return self.replan(full=True)

    # ---- assignments -------------------------------------------------------------------

    def assignment_for(self, record: WorkerRecord) -> pb.Assignment:
        assert self.plan is not None and record.stage_index >= 0
        stage = record.stage_index
        start, end = self._span(stage)
        choice = self.compression_for(record)
        stage0 = sorted(self._stage_members(0))
        assignment = pb.Assignment(
            plan_version=record.assigned_version,
            stage_index=stage,
            num_stages=self.plan.num_stages,
            layer_start=start,
            layer_end=end,
            activation_compression=_spec(choice.activation_codec, choice),
            sync_compression=_spec(choice.sync_codec, choice),
            sync_period_steps=choice.sync_period,
            averaging_group=f"{self.config.coordinator.run_id}.stage{stage}.layers{start}-{end}",
            config_hash=self.config_hash,
            lease_expires_unix=record.lease_expires_unix,
            stage_boundaries=list(self.plan.boundaries),
        )
        if stage == 0:
            assignment.data_shard_index = stage0.index(record.worker_id)
            assignment.data_shard_count = len(stage0)
        return assignment

    def compression_for(self, record: WorkerRecord) -> WorkerCompression:
        assert self.plan is not None
        profile = self.worker_profile(record)
        start, end = self._span(record.stage_index)
        cost = self.profile.stage_cost(start, end)
        stages = self.plan.num_stages
        crossings = 0 if stages == 1 else 1 if record.stage_index in (0, stages - 1) else 2
        return choose_compression(
            self.policy,
            link_bps=min(profile.upload_bps, profile.download_bps),
            compute_tokens_per_s=profile.achieved_flops / cost.train_flops_per_token,
            activation_bytes_per_token_sent=cost.activation_bytes_per_token * crossings,
            stage_param_bytes=cost.params * 4,
            tokens_per_step=self.config.training.tokens_per_step,
        )

    # ---- helpers -----------------------------------------------------------------------

    def _check_admission(self, request: pb.JoinRequest) -> None:
        wanted = self.config.coordinator.join_token
        if wanted and not hmac.compare_digest(request.join_token.encode(), wanted.encode()):
            what = "no join token" if not request.join_token else "a wrong join token"
            raise InvalidRequest(
                "UNAUTHENTICATED", f"{what}: this swarm admits workers started with --join-token <token>"
            )
        theirs = request.profile.software_version
        if not same_release_line(SOFTWARE_VERSION, theirs):
            raise InvalidRequest(
                "FAILED_PRECONDITION",
                f"worker runs swarmtrain {theirs}, this swarm runs {SOFTWARE_VERSION}: "
                f"install swarmtrain {'.'.join(SOFTWARE_VERSION.split('.')[:2])}.x and rejoin",
            )

    def _authenticate(self, worker_id: str, session_token: str) -> WorkerRecord:
        record = self.registry.workers.get(worker_id)
        if record is None:
            raise InvalidRequest("NOT_FOUND", f"unknown worker {worker_id}: call Join without an id to register")
        if not hmac.compare_digest(record.token_hash, hash_token(session_token)):
            raise InvalidRequest("UNAUTHENTICATED", f"wrong session token for worker {worker_id}")
        return record

    def _note_measured_rate(self, worker_id: str, counters: pb.Counters) -> None:
        if counters.tokens and counters.compute_seconds > 0:
            rate = counters.tokens / counters.compute_seconds
            old = self._measured.get(worker_id)
            self._measured[worker_id] = rate if old is None else old + MEASURED_RATE_WEIGHT * (rate - old)

    def _is_last_stage(self, record: WorkerRecord) -> bool:
        return self.plan is not None and record.stage_index == self.plan.num_stages - 1

    def _span(self, stage: int) -> tuple[int, int]:
        assert self.plan is not None
        return self.plan.boundaries[stage], self.plan.boundaries[stage + 1]

    def _stage_members(self, stage: int) -> set[str]:
        return {r.worker_id for r in self.registry.active() if r.stage_index == stage}

    def _plan_from(self, boundaries: tuple[int, ...], stage_of: dict[str, int]) -> Plan:
        workers = [self.capacity(r) for r in self.registry.active() if r.worker_id in stage_of]
        rates = evaluate(self.profile, workers, boundaries, stage_of)
        return Plan(boundaries=boundaries, stage_of=dict(stage_of), stage_rates=rates, note="restored")

    def swarm_rate(self) -> float:
        return self.plan.rate if self.plan else 0.0



def _spec(codec: str, choice: WorkerCompression) -> pb.CompressionSpec:
    return pb.CompressionSpec(
        codec=pb.Codec.Value(f"CODEC_{codec.upper()}"),
        block_size=choice.block_size,
        topk_fraction=choice.topk_fraction,
        rank=choice.rank,
    )
