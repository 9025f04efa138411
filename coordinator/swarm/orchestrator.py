"""The coordinator's decisions, without gRPC: who is in the swarm, what each worker serves.

The service (coordinator/api/service.py) validates requests and converts messages; this module
admits workers, keeps the plan, and answers heartbeats. Refusals are `InvalidRequest`s
carrying the status code to answer with.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from configs.catalog import load_catalog
from configs.profile import model_profile
from configs.schema import RunConfig
from configs.version import SOFTWARE_VERSION
from coordinator.storage.checkpoints import (
    CheckpointRefused,
    CheckpointStore,
    choose_writers,
    pick_writer,
    upload_limit,
)
from coordinator.planning.compression_policy import (
    WorkerCompression,
    choose_compression,
    compression_spec,
    heaviest_activation_ratio,
)
from coordinator.costs.meter import CostMeter, SwarmRates, worker_rates
from coordinator.storage.join_tokens import JoinToken, hash_join_token
from coordinator.swarm.trust import Strike, add_strike, ban_verdict, credible
from coordinator.planning.planner import InfeasiblePlanError, Plan, WorkerCapacity, evaluate, patch, replan
from coordinator.storage.registry import (
    ACTIVE,
    BANNED,
    EXPELLED,
    GONE,
    LEFT,
    REVOKED,
    Registry,
    WorkerRecord,
    hash_token,
    new_record,
)
from coordinator.api.validation import InvalidRequest, same_release_line
from protos import swarmtrain_pb2 as pb

MEASURED_RATE_WEIGHT = 0.3  # EMA weight of the newest heartbeat's measured compute rate
MIN_MEASUREMENTS = 3  # heartbeats that measured a worker before its compression follows the measure
# Up to this many workers every join/leave runs the full planner search (well under 0.1 s);
# above it, events patch the plan in one cheap pass and the search runs periodically.
FULL_REPLAN_MAX_WORKERS = 256


REPORTS_TO_LOG = 10  # a peer refused this often is named in the operator's log, once
RATE_WINDOW_S = 60.0  # the measured swarm throughput is averaged over about this long
TOKEN_REREAD_S = 1.0  # an unknown join token re-reads the tokens table at most this often

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
        self._measurements: dict[str, int] = {}  # worker -> heartbeats that measured it
        self._issued: dict[str, WorkerCompression] = {}  # worker -> the compression its assignment carries
        self._reissued_at: dict[str, float] = {}  # worker -> when its compression was last re-issued
        self._profiles: dict[str, pb.WorkerProfile] = {}  # parsed once, not on every re-plan
        # bytes by kind the workers reported since this process started (kept in memory: a
        # restart resets them, as Prometheus counters may)
        self.traffic: dict[int, pb.TrafficCounter] = {}
        self.reports_by_reason: dict[str, int] = {}  # messages workers refused from other peers
        self.reports_by_peer: dict[str, int] = {}
        self._strikes: dict[str, tuple[Strike, ...]] = {}  # target worker id -> credible reports (memory only)
        self._peer_owner: dict[str, str] = {}  # data-plane peer id -> the worker that registered it
        self._banned_peers: dict[str, str] = {}  # peer id -> the banned worker that had it
        for record in registry.workers.values():
            self._claim_peer(record)
        self.tokens: dict[str, JoinToken] = {}  # managed join tokens by hash
        self._tokens_read_at = float("-inf")
        self._revoked_seen: set[str] = set()
        self.catalog = load_catalog()
        self.cost = CostMeter(config.metrics.energy_usd_per_kwh)
        self._progress_seen: deque[tuple[float, int]] = deque()  # (time, trained tokens) per sweep
        # when a fresh plan last replaced the kept one; counted from the start, because the rates
        # measured in a swarm's first minutes (warm-up, state downloads, joins) are mostly noise
        self._reshuffled_at = clock()
        self.checkpoints = CheckpointStore(config.state_path / "checkpoints", registry.connection,
                                           config.coordinator.checkpoints_kept, clock)
        latest = self.checkpoints.latest
        # the first checkpoint comes one interval after the newest one, or after this start
        self._checkpoint_tried = latest.opened_unix if latest else clock()
        loaded = registry.load_plan()
        if loaded:
            self.plan_version, body = loaded
            self.note = body.get("note", "")
            if body.get("boundaries"):
                self.plan = self._plan_from(tuple(body["boundaries"]), body["stage_of"])
        self.restart_clocks()
        self.refresh_tokens()  # tokens revoked while the coordinator was down

    def restart_clocks(self) -> None:
        """The coordinator was away: its workers could not beat. Start their clocks afresh (the
        server calls this again once it listens: starting up may take longer than the timeout)."""
        now = self.clock()
        for record in self.registry.active():
            self.registry.record_heartbeat(replace(record, last_heartbeat_unix=now))

    # ---- RPC entry points --------------------------------------------------------------

    def join(self, request: pb.JoinRequest, address: str) -> tuple[WorkerRecord, str]:
        token_name = self._check_admission(request)
        if request.worker_id:
            existing = self._authenticate(request.worker_id, request.session_token)
            if existing.state in EXPELLED:
                raise InvalidRequest("PERMISSION_DENIED", expelled_message(existing))
        self._check_peer_id(request.worker_id, request.profile.peer_id)
        self.accrue_cost()  # the time so far at the rates before this worker
        now = self.clock()
        lease = self.config.coordinator.lease_s
        profile_bytes = request.profile.SerializeToString(deterministic=True)
        if request.worker_id:
            token = request.session_token
            self._release_peer(existing)  # it may come back with another peer id
            record = replace(existing, profile=profile_bytes, state=ACTIVE, last_heartbeat_unix=now,
                             lease_expires_unix=now + lease, address=address, join_token_name=token_name)
        else:
            worker_id = f"w-{secrets.token_hex(6)}"
            token = secrets.token_urlsafe(24)
            record = new_record(worker_id, token, profile_bytes, now, lease, address, token_name)
        self.registry.upsert_worker(record)
        self._profiles[record.worker_id] = request.profile
        self._claim_peer(record)
        self.replan()
        return self.registry.workers[record.worker_id], token

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        record = self._authenticate(request.worker_id, request.session_token)
        if record.state in EXPELLED:
            raise InvalidRequest("PERMISSION_DENIED", expelled_message(record))
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
        record = self.registry.workers[record.worker_id]  # a ban may have re-planned it meanwhile
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
        else:  # runs its current assignment: it may be asked for its stage's checkpoint part
            wanted = self.checkpoints.request_for(record.worker_id, record.stage_index)
            if wanted is not None:
                response.checkpoint.CopyFrom(wanted)
        return response

    def _note_reports(self, reporter: str, reports: Sequence[pb.PeerReport]) -> None:
        """Peers a worker refused messages from: counted by reason, and by the peer reported;
        credible reports strike the reported worker, and enough strikes ban it."""
        for report in reports:
            self._strike(reporter, report.peer_id, report.reason)
            self.reports_by_reason[report.reason] = self.reports_by_reason.get(report.reason, 0) + report.count
            before = self.reports_by_peer.get(report.peer_id, 0)
            self.reports_by_peer[report.peer_id] = before + report.count
            if before < REPORTS_TO_LOG <= before + report.count:
                who = next((r.worker_id for r in self.registry.workers.values()
                            if self.worker_profile(r).peer_id == report.peer_id), "not a worker of this swarm")
                print(f"warning: peer {report.peer_id} ({who}) reported {before + report.count} times, "
                      f"last by {reporter}: {report.reason}", flush=True)

    def _strike(self, reporter_id: str, peer_id: str, reason: str) -> None:
        target_id = self._peer_owner.get(peer_id)
        target = self.registry.workers.get(target_id) if target_id else None
        reporter = self.registry.workers[reporter_id]
        if target is None or target.state != ACTIVE or target_id == reporter_id:
            return
        if not credible(reason, reporter.stage_index, target.stage_index):
            return
        history = add_strike(self._strikes.get(target.worker_id, ()), Strike(reporter_id, reason, self.clock()),
                             min_gap_s=self.config.coordinator.heartbeat_interval_s / 2)
        self._strikes[target.worker_id] = history
        live = {s.reporter for s in history if self.registry.workers[s.reporter].state == ACTIVE}
        verdict = ban_verdict(history, self.config.coordinator.ban_after_reports, live)
        if verdict:
            self._ban(target, verdict)

    def _ban(self, record: WorkerRecord, verdict: str) -> None:
        """Out of the registry's active workers (so out of GetSwarm's and the data plane's), for good."""
        self.accrue_cost()
        banned = replace(record, state=BANNED, stage_index=-1, expelled_reason=f"banned after {verdict}")
        self.registry.upsert_worker(banned)
        self._strikes.pop(record.worker_id, None)
        peer_id = self.worker_profile(record).peer_id
        self._claim_peer(banned)
        print(f"banned worker {record.worker_id} (peer {peer_id}): {verdict}", flush=True)
        self.replan()

    def _add_traffic(self, reported: Sequence[pb.TrafficCounter]) -> None:
        for counter in reported:
            total = self.traffic.setdefault(counter.kind, pb.TrafficCounter(kind=counter.kind))
            total.sent_bytes += counter.sent_bytes
            total.received_bytes += counter.received_bytes
            total.uncompressed_bytes += counter.uncompressed_bytes

    def leave(self, request: pb.LeaveRequest) -> None:
        record = self._authenticate(request.worker_id, request.session_token)
        self.accrue_cost()
        if record.state == LEFT or record.state in EXPELLED:
            return  # a retried Leave is not an error; an expelled worker stays expelled
        self.registry.upsert_worker(replace(record, state=LEFT, stage_index=-1))
        self.replan()

    def live_rates(self) -> SwarmRates:
        """The active workers' summed $/h, board power and peak FLOP/s."""
        return SwarmRates.of(worker_rates(self.worker_profile(r), self.catalog) for r in self.registry.active())

    def accrue_cost(self) -> None:
        """Bill the time since the last call at the live swarm's rates (see coordinator.costs.meter)."""
        self.cost.accrue(self.clock(), self.live_rates())

    def measured_tokens_per_second(self) -> float:
        """Trained tokens per second over the last minute of sweeps; 0 before two sweeps."""
        if not self._progress_seen:
            return 0.0
        then, tokens = self._progress_seen[0]
        seconds = self.clock() - then
        return (self.registry.progress.trained_tokens - tokens) / seconds if seconds > 0 else 0.0

    def sweep(self) -> list[str]:
        """Mark workers silent for longer than the timeout as gone, and re-plan without them.
        Also re-reads the join tokens, so that a revocation takes effect."""
        self.refresh_tokens()
        self.accrue_cost()
        now = self.clock()
        self._progress_seen.append((now, self.registry.progress.trained_tokens))
        while len(self._progress_seen) > 2 and now - self._progress_seen[1][0] >= RATE_WINDOW_S:
            self._progress_seen.popleft()
        expired = self.registry.expired(self.clock(), self.config.coordinator.heartbeat_timeout_s)
        if expired:
            self.registry.update_workers([replace(w, state=GONE, stage_index=-1) for w in expired])
            self.replan()
        self.checkpoint_tick()
        return [w.worker_id for w in expired]

    # ---- checkpoints -------------------------------------------------------------------

    def checkpoint_tick(self) -> None:
        """Open a checkpoint when one is due; watch the open one: a changed plan or the timeout
        abandons it, and a stage whose writer went away gets another writer."""
        c, store, now = self.config.coordinator, self.checkpoints, self.clock()
        members: dict[int, list[tuple[str, int]]] = {}
        for r in self.registry.active():
            if r.stage_index >= 0:
                members.setdefault(r.stage_index, []).append((r.worker_id, r.local_step))
        checkpoint = store.open
        if checkpoint is not None:
            if self.plan is None or tuple(self.plan.boundaries) != checkpoint.boundaries:
                store.abandon("the plan changed while it was written")
                self._checkpoint_tried = now - c.checkpoint_interval_s  # try again at once
            elif now - checkpoint.opened_unix > c.checkpoint_timeout_s:
                missing = sorted(set(range(checkpoint.num_stages)) - set(checkpoint.parts))
                store.abandon(f"stage(s) {', '.join(map(str, missing))} not uploaded within "
                              f"{c.checkpoint_timeout_s:.0f}s")
            else:
                for stage, writer in list(checkpoint.writers.items()):
                    alive = [m for m in members.get(stage, []) if m[0] == writer]
                    if stage not in checkpoint.parts and not alive and members.get(stage):
                        checkpoint.writers[stage] = pick_writer(members[stage])
            return
        if c.checkpoint_interval_s <= 0 or self.plan is None or now - self._checkpoint_tried < c.checkpoint_interval_s:
            return
        writers = choose_writers(members, self.plan.num_stages)
        if writers is None:
            return  # a stage has no worker: its state would be missing
        self._checkpoint_tried = now
        store.open_checkpoint(self.plan.boundaries, writers, self.registry.progress.trained_tokens)

    def authorize_checkpoint_transfer(self, worker_id: str, session_token: str, start: int, end: int) -> int:
        """Authenticate a worker that uploads or downloads checkpoint files of layers [start, end);
        the most bytes such a file may take."""
        record = self._authenticate(worker_id, session_token)
        if record.state != ACTIVE:
            raise InvalidRequest("FAILED_PRECONDITION", f"worker {worker_id} is not active: join again first")
        if not 0 <= start < end <= self.profile.n_layer:
            raise CheckpointRefused("INVALID_ARGUMENT",
                                    f"layers [{start}, {end}) are not a part of [0, {self.profile.n_layer})")
        return upload_limit(self.profile.stage_cost(start, end).params)

    def refresh_tokens(self) -> list[str]:
        """Re-read the managed join tokens; expel every worker admitted with one revoked since the
        last read. Returns the expelled workers' ids."""
        self.tokens = self.registry.tokens.by_hash()
        self._tokens_read_at = self.clock()
        revoked = {t.name for t in self.tokens.values() if t.revoked}
        fresh, self._revoked_seen = revoked - self._revoked_seen, revoked
        if not fresh:
            return []
        victims = [r for r in self.registry.workers.values() if r.join_token_name in fresh and r.state not in EXPELLED]
        if not victims:
            return []
        self.accrue_cost()
        self.registry.update_workers([
            replace(r, state=REVOKED, stage_index=-1, expelled_reason=f"expelled: join token {r.join_token_name} "
                    "was revoked; ask the swarm's operator for a new token") for r in victims])
        for name in sorted({r.join_token_name for r in victims}):
            ids = sorted(r.worker_id for r in victims if r.join_token_name == name)
            print(f"join token {name} revoked: expelled {len(ids)} worker(s): {' '.join(ids)}", flush=True)
        self.replan()
        return [r.worker_id for r in victims]

    # ---- planning ----------------------------------------------------------------------

    def worker_profile(self, record: WorkerRecord) -> pb.WorkerProfile:
        profile = self._profiles.get(record.worker_id)
        if profile is None:
            profile = self._profiles[record.worker_id] = pb.WorkerProfile.FromString(record.profile)
        return profile

    def achieved_flops(self, record: WorkerRecord) -> float:
        """The worker's FLOP/s: as measured on its stage once known, else its benchmark's."""
        measured = self._measured.get(record.worker_id)
        if measured and self.plan and 0 <= record.stage_index < self.plan.num_stages:
            # drift: trust what the worker really computes on its stage over its benchmark
            start, end = self._span(record.stage_index)
            return measured * self.profile.stage_cost(start, end).train_flops_per_token
        return self.worker_profile(record).achieved_flops

    def capacity(self, record: WorkerRecord) -> WorkerCapacity:
        profile = self.worker_profile(record)
        return WorkerCapacity(
            worker_id=record.worker_id,
            achieved_flops=self.achieved_flops(record),
            memory_bytes=profile.memory_bytes,
            upload_bps=profile.upload_bps,
            download_bps=profile.download_bps,
            activation_compression_ratio=self._activation_ratio,
            stage_index=record.stage_index,
        )

    def replan(self, *, full: bool | None = None, for_speed: bool = False) -> bool:
        """Re-plan (full search with hysteresis, or a cheap patch on large swarms); commit the
        plan and every changed assignment. True if any worker's assignment changed.

        `for_speed`: nothing joined or left, only measured rates moved. Those are noisy, so
        such a re-plan reshuffles at most every `replan_min_interval_s` (and patches otherwise)."""
        active = sorted(self.registry.active(), key=lambda r: r.worker_id)
        workers = [self.capacity(r) for r in active]
        if full is None:
            full = self.plan is None or len(active) <= FULL_REPLAN_MAX_WORKERS
        try:
            new_plan: Plan | None = None
            if not full and self.plan is not None:
                new_plan = patch(self.profile, workers, self.plan)
            if new_plan is None or new_plan.rate <= 0:
                c = self.config.coordinator
                calm = for_speed and self.clock() - self._reshuffled_at < c.replan_min_interval_s
                new_plan = replan(self.profile, workers, self.plan, min_gain=math.inf if calm else c.replan_min_gain)
                if new_plan.note.startswith("re-planned"):
                    self._reshuffled_at = self.clock()
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
        self.registry.save_plan(self.plan_version, self._plan_body(new_plan, note), moved_records)
        return bool(changed)

    def check_drift(self) -> bool:
        """The periodic full search: adopts another plan only if it beats this one (measured
        rates included) by more than the hysteresis threshold. Then re-issues the assignments
        whose compression the measured rates change (`refresh_compression`)."""
        moved = self.replan(full=True, for_speed=True)
        return self.refresh_compression() or moved

    def refresh_compression(self) -> bool:
        """Re-issue the assignment of each worker for which the policy, given the compute rate
        measured on its stage, now picks other codecs or another averaging period than its
        assignment carries: those were chosen from its benchmark, and a CPU's matmul benchmark
        can overstate a small stage's rate about 2x (tiny at 20 Mbit/s: 31k tokens/s benchmarked,
        ~14k measured), which took its rounds from 8-bit every 64 steps to top-k every 256.
        Not before MIN_MEASUREMENTS heartbeats measured the worker, and, against noisy rates, not
        again within `replan_min_interval_s` of its last re-issue. True if any was re-issued."""
        if self.plan is None:
            return False
        now, interval = self.clock(), self.config.coordinator.replan_min_interval_s
        stale = []
        for record in self.registry.active():
            issued = self._issued.get(record.worker_id)
            last = self._reissued_at.get(record.worker_id)
            if (issued is None or record.stage_index < 0
                    or self._measurements.get(record.worker_id, 0) < MIN_MEASUREMENTS
                    or (last is not None and now - last < interval)):
                continue
            if self.compression_for(record) != issued:
                stale.append(record)
        if not stale:
            return False
        self.plan_version += 1
        self.registry.save_plan(self.plan_version, self._plan_body(self.plan, self.note),
                                [replace(r, assigned_version=self.plan_version) for r in stale])
        for record in stale:
            self._reissued_at[record.worker_id] = now
        return True

    @staticmethod
    def _plan_body(plan: Plan | None, note: str) -> dict:
        """What the registry keeps of a plan."""
        return {
            "boundaries": list(plan.boundaries) if plan else [],
            "stage_of": dict(plan.stage_of) if plan else {},
            "note": note,
        }

    # ---- assignments -------------------------------------------------------------------

    def assignment_for(self, record: WorkerRecord) -> pb.Assignment:
        assert self.plan is not None and record.stage_index >= 0
        stage = record.stage_index
        start, end = self._span(stage)
        choice = self._issued[record.worker_id] = self.compression_for(record)
        stage0 = sorted(self._stage_members(0))
        assignment = pb.Assignment(
            plan_version=record.assigned_version,
            stage_index=stage,
            num_stages=self.plan.num_stages,
            layer_start=start,
            layer_end=end,
            activation_compression=compression_spec(choice.activation_codec, choice),
            sync_compression=compression_spec(choice.sync_codec, choice),
            sync_period_steps=choice.sync_period,
            overlap_steps=choice.overlap_steps,
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
            compute_tokens_per_s=self.achieved_flops(record) / cost.train_flops_per_token,
            activation_bytes_per_token_sent=cost.activation_bytes_per_token * crossings,
            stage_param_bytes=cost.params * 4,
            tokens_per_step=self.config.training.tokens_per_step,
            microbatch_tokens=self.config.training.tokens_per_microbatch,
        )

    # ---- helpers -----------------------------------------------------------------------

    def _check_admission(self, request: pb.JoinRequest) -> str:
        """Refuse a Join without a valid join token or with another release; returns the name of
        the managed token that admits it ('' for the config's token, or a swarm open to all)."""
        token_name = self._admitting_token(request.join_token)
        theirs = request.profile.software_version
        if not same_release_line(SOFTWARE_VERSION, theirs):
            raise InvalidRequest(
                "FAILED_PRECONDITION",
                f"worker runs swarmtrain {theirs}, this swarm runs {SOFTWARE_VERSION}: "
                f"install swarmtrain {'.'.join(SOFTWARE_VERSION.split('.')[:2])}.x and rejoin",
            )
        return token_name

    def _admitting_token(self, presented: str) -> str:
        static = self.config.coordinator.join_token
        if static and hmac.compare_digest(presented.encode(), static.encode()):
            return ""
        token = self._managed_token(presented) if presented else None
        if token is not None and token.revoked:
            raise InvalidRequest("UNAUTHENTICATED",
                                 f"join token {token.name} was revoked: ask the swarm's operator for a new one")
        if token is not None:
            return token.name
        # Once the operator has issued a token the swarm stays closed, even when all are revoked.
        if static or self.tokens:
            what = "no join token" if not presented else "a wrong join token"
            raise InvalidRequest(
                "UNAUTHENTICATED", f"{what}: this swarm admits workers started with --join-token <token>"
            )
        return ""

    def _managed_token(self, presented: str) -> JoinToken | None:
        """The managed token presented (a random secret: matched by its hash); a token just added
        by the CLI is found by re-reading the table, at most every TOKEN_REREAD_S."""
        digest = hash_join_token(presented)
        if digest not in self.tokens and self.clock() - self._tokens_read_at >= TOKEN_REREAD_S:
            self.refresh_tokens()
        return self.tokens.get(digest)

    def _check_peer_id(self, worker_id: str, peer_id: str) -> None:
        """A banned peer id stays out under any worker id; a live one belongs to one worker."""
        if not peer_id:
            return
        banned = self._banned_peers.get(peer_id)
        if banned is not None:
            reason = self.registry.workers[banned].expelled_reason
            raise InvalidRequest("PERMISSION_DENIED", f"peer {peer_id} belongs to worker {banned}, which was {reason}")
        owner = self._peer_owner.get(peer_id)
        if owner is not None and owner != worker_id and self.registry.workers[owner].state == ACTIVE:
            raise InvalidRequest("ALREADY_EXISTS", f"peer {peer_id} is already registered by worker {owner}")

    def _release_peer(self, record: WorkerRecord) -> None:
        peer_id = self.worker_profile(record).peer_id
        if self._peer_owner.get(peer_id) == record.worker_id:
            del self._peer_owner[peer_id]

    def _claim_peer(self, record: WorkerRecord) -> None:
        peer_id = self.worker_profile(record).peer_id
        if not peer_id:
            return
        self._peer_owner[peer_id] = record.worker_id
        if record.state == BANNED:
            self._banned_peers[peer_id] = record.worker_id

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
            self._measurements[worker_id] = self._measurements.get(worker_id, 0) + 1

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



def expelled_message(record: WorkerRecord) -> str:
    """The one line a banned or revoked worker is answered with."""
    return f"worker {record.worker_id} was {record.expelled_reason}"
