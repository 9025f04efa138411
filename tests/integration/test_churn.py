"""Churn and coordinator outages under real training, driven by the fault-injection harness.

Real `worker` processes train the tiny model in a pipeline under a real coordinator; faults
fire at training steps read from stage 0's `--trace` files (tests/harness/faults.py):

- a replica of stage 1 is SIGKILLed while microbatches are in flight: the driver retries them
  on the other replica, no step is lost or skipped, the coordinator marks the worker gone, and
  a replacement that joins downloads its stage's state from a live peer and then agrees with it
  in an averaging round;
- the last replica of a stage is SIGKILLed: the planner moves a survivor so every stage is
  served again, and training resumes;
- the coordinator is `kill -9`ed: the pipeline trains on through the outage on its leases, and
  after a restart on the same state and port the workers re-register by themselves, with the
  same ids and stages and no new plan.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos import swarmtrain_pb2 as pb
from tests.harness.coordinator_process import CoordinatorProcess, wait_for
from tests.harness.faults import Fault, FaultInjector, trace_steps
from tests.harness.swarm import TRAINING_PACE, free_port
from tests.harness.worker_process import SMALL, WorkerProcess, Workers
from worker.telemetry.trace import read_trace

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.training]

UP_S = 90.0  # a few workers starting, joining and building on two shared cores
ROUTE_REFRESH_S = 3.0  # worker.runtime.swarm_view: how often a driver re-reads the route


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path / "state", *TRAINING_PACE)
    yield process
    process.kill()
    (tmp_path / "coordinator.log").write_text(process.output)


@pytest.fixture(autouse=True)
def keep_logs(tmp_path: Path, workers: Workers) -> Iterator[None]:
    """Every worker's output, kept beside the traces for a look after a failure."""
    yield
    for i, worker in enumerate(workers):
        (tmp_path / f"worker-process{i}.log").write_text(worker.output)


def join_args(coordinator: CoordinatorProcess, trace: Path) -> list[str]:
    return ["--coordinator", coordinator.endpoint, "--host", "127.0.0.1", *SMALL, "--link-mbps", "10000",
            "--trace", str(trace)]


def steps(trace: Path, since: float = 0.0) -> list[dict]:
    return [e for e in read_trace(trace) if e["event"] == "step" and e["time"] >= since] if trace.exists() else []


def stages_of(coordinator: CoordinatorProcess) -> dict[str, int]:
    return {w.worker_id: w.stage_index for w in coordinator.swarm().workers if w.state == pb.WORKER_STATE_ACTIVE}


def served(coordinator: CoordinatorProcess, layout: list[int] | None = None) -> bool:
    """Every planned stage has an active worker (and the layout is `layout`, if given)."""
    swarm = coordinator.swarm()
    active = [s.active_workers for s in swarm.stages]
    return bool(active) and all(active) and (layout is None or active == layout)


def start_swarm(coordinator: CoordinatorProcess, workers: Workers, traces: list[Path],
                layout: list[int] | None = None) -> list[str]:
    """Two workers first (they start from the seed), then the rest: the worker ids, in order."""
    for trace in traces[:2]:
        workers.spawn(*join_args(coordinator, trace))
    for worker in workers[:2]:
        worker.wait_event("assigned", timeout=UP_S)
    for trace in traces[2:]:
        workers.spawn(*join_args(coordinator, trace))
    ids = [worker.wait_event("assigned", timeout=UP_S)["worker_id"] for worker in workers]
    wait_for(lambda: len(stages_of(coordinator)) == len(traces) and served(coordinator, layout),
             timeout=UP_S, what=f"{len(traces)} active workers, every stage served", poll=0.25)
    return ids


def stints(trace: Path) -> list[list[int]]:
    """The step numbers a driver wrote, one list per assignment (a re-plan may move it away and
    back; it then starts from the step of the state it downloaded)."""
    runs: list[list[int]] = [[]]
    for e in read_trace(trace) if trace.exists() else []:
        if e["event"] == "assign":
            runs.append([])
        elif e["event"] == "step":
            runs[-1].append(e["step"])
    return [r for r in runs if r]


def consecutive(numbers: list[int]) -> bool:
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def fail_with_logs(err: Exception, workers: list[WorkerProcess]) -> AssertionError:
    return AssertionError(f"{err}\n\n" + "\n\n".join(f"--- worker {i}\n{w.output}" for i, w in enumerate(workers)))


def assert_survivors_leave_cleanly(workers: list[WorkerProcess], dead: set[int]) -> None:
    for i, worker in enumerate(workers):
        if i in dead:
            continue
        assert worker.proc.poll() is None, worker.output
        code, _ = worker.terminate(timeout=20)
        assert code == 0, worker.output
        assert "Traceback" not in worker.output, worker.output


@pytest.mark.fault("SIGKILL of one of two replicas of a stage mid-run")
def test_a_killed_replica_is_retried_around_and_its_replacement_catches_up_from_a_peer(
    coordinator: CoordinatorProcess, workers: Workers, tmp_path: Path
) -> None:
    traces = [tmp_path / f"worker{i}.jsonl" for i in range(4)]
    ids = start_swarm(coordinator, workers, traces, layout=[2, 2])
    stage = stages_of(coordinator)
    drivers = [i for i in range(4) if stage[ids[i]] == 0]
    victim = next(i for i in range(4) if stage[ids[i]] == 1)
    try:
        wait_for(lambda: all(steps(traces[i]) for i in drivers), timeout=UP_S, what="both drivers stepping",
                 poll=0.25)
    except TimeoutError as err:
        raise fail_with_logs(err, workers) from None

    targets: list = list(workers)  # the injector's view: a restart replaces its entry
    first = trace_steps(traces)
    kill_at, restart_at = first + 2, first + 32
    injector = FaultInjector([Fault(kill_at, "kill", victim), Fault(restart_at, "restart", victim)], targets,
                             progress=lambda: trace_steps(traces),
                             respawn=lambda i: workers.spawn(*join_args(coordinator, traces[i])))
    try:
        injector.run(timeout=60)
    except TimeoutError as err:
        raise fail_with_logs(err, workers) from None
    killed, restarted = injector.fired
    assert killed.fault.action == "kill" and workers[victim].proc.returncode == -9
    # training went on between the kill and the restart (keyed on 30 more steps): count them
    assert sum(len(steps(trace, since=killed.time)) for trace in traces) >= 20

    # the coordinator noticed the silence and re-planned without the victim
    wait_for(lambda: next(w for w in coordinator.swarm().workers if w.worker_id == ids[victim]).state
             == pb.WORKER_STATE_GONE, timeout=30, what="the killed worker marked gone", poll=0.25)

    # its replacement joins with a new id, gets a stage, and starts from a live peer's state
    replacement = targets[victim]
    new_id = replacement.wait_event("assigned", timeout=UP_S)["worker_id"]
    assert new_id != ids[victim]
    downloaded = replacement.wait_event("state", lambda e: e["outcome"] == "downloaded", timeout=30)
    assert downloaded["bytes"] > 100_000, downloaded  # the stage's fp32 parameters
    wait_for(lambda: served(coordinator, [2, 2]), timeout=30, what="2 x 2 again with the replacement", poll=0.25)

    # then it takes part in an averaging round of its stage and ends it with its peer's parameters
    def joint_round() -> set[str] | None:  # of whichever stage it serves then: a re-plan may move it
        mine = {e["round"]: e["digest"] for e in read_trace(traces[victim])
                if e["event"] == "sync" and e["time"] >= restarted.time}
        for i, trace in enumerate(traces):
            if i == victim:
                continue
            for e in read_trace(trace):
                if e["event"] == "sync" and e["round"] in mine:
                    return {mine[e["round"]], e["digest"]}
        return None
    try:
        digests = wait_for(joint_round, timeout=60, what="a round of the replacement with a peer", poll=0.5)
    except TimeoutError as err:
        raise fail_with_logs(err, workers) from None
    assert len(digests) == 1, digests

    # no step lost or skipped: each driver's steps are consecutive, and its microbatches that
    # were in flight on the victim were retried on the other replica
    for trace in traces:
        assert all(consecutive(run) for run in stints(trace)), (trace.name, stints(trace))
    retried = sum(e["retries"] for trace in traces for e in steps(trace, since=killed.time))
    assert retried >= 1, "no microbatch was retried after the kill"
    assert not any("Traceback" in w.output for w in workers)
    assert_survivors_leave_cleanly(workers, dead={victim})


@pytest.mark.fault("the last replica of a stage dies while another stage has two")
def test_when_the_last_replica_of_a_stage_dies_a_survivor_is_moved_and_training_resumes(
    coordinator: CoordinatorProcess, workers: Workers, tmp_path: Path
) -> None:
    traces = [tmp_path / f"worker{i}.jsonl" for i in range(3)]
    ids = start_swarm(coordinator, workers, traces)
    swarm = coordinator.swarm()
    lonely = next(s.stage_index for s in swarm.stages if s.active_workers == 1)
    stage = stages_of(coordinator)
    victim = next(i for i in range(3) if stage[ids[i]] == lonely)
    wait_for(lambda: trace_steps(traces) >= 1, timeout=UP_S, what="training", poll=0.25)
    version = coordinator.swarm().plan_version

    injector = FaultInjector([Fault(trace_steps(traces) + 2, "kill", victim)], list(workers),
                             progress=lambda: trace_steps(traces))
    try:
        injector.run(timeout=60)
    except TimeoutError as err:
        raise fail_with_logs(err, workers) from None
    (killed,) = injector.fired

    def replanned() -> bool:
        swarm = coordinator.swarm()
        gone = next(w for w in swarm.workers if w.worker_id == ids[victim]).state == pb.WORKER_STATE_GONE
        return gone and swarm.plan_version > version and served(coordinator)
    wait_for(replanned, timeout=30, what="a plan that serves every stage without the victim", poll=0.25)
    swarm = coordinator.swarm()
    assert len([w for w in swarm.workers if w.state == pb.WORKER_STATE_ACTIVE]) == 2
    assert all(s.active_workers == 1 for s in swarm.stages), [s.active_workers for s in swarm.stages]
    moved = next(i for i in range(3) if i != victim and stages_of(coordinator)[ids[i]] != stage[ids[i]])
    workers[moved].wait_event("assigned", lambda e: e["stage"] == lonely, timeout=30)

    # training resumes: stage 0 (maybe a new driver, from the seed if its stage had no survivor) steps on
    try:
        wait_for(lambda: sum(len(steps(t, since=killed.time)) for t in traces) >= 10, timeout=60,
                 what="10 steps after the kill", poll=0.5)
    except TimeoutError as err:
        raise fail_with_logs(err, workers) from None
    assert_survivors_leave_cleanly(workers, dead={victim})


@pytest.mark.fault("kill -9 of the coordinator mid-run, restarted on its state and port")
def test_training_rides_out_a_coordinator_kill_and_workers_reregister_with_the_same_stages(
    tmp_path: Path, workers: Workers
) -> None:
    port = free_port()  # the restarted coordinator must answer where the first one did
    args = (tmp_path / "state", *TRAINING_PACE, "--grpc-port", str(port))
    traces = [tmp_path / f"worker{i}.jsonl" for i in range(2)]
    first = CoordinatorProcess(*args)
    try:
        ids = start_swarm(first, workers, traces, layout=[1, 1])
        wait_for(lambda: trace_steps(traces) >= 3, timeout=UP_S, what="3 steps", poll=0.25)
        before = first.swarm()
        tokens_before = before.progress.trained_tokens
        # marked before the kill: a worker may say it lost the coordinator within a heartbeat
        # (a CI run saw it land before marks taken after the kill, and waited for it in vain)
        assigned = {i: len(w.events("assigned")) for i, w in enumerate(workers)}
        marks = [w.mark() for w in workers]
        first.kill_9()
        down_at = time.time()
    finally:
        first.kill()
    for worker, mark in zip(workers, marks, strict=True):
        worker.wait_event("unreachable", after=mark, timeout=15)

    # training goes on without the control plane, past the drivers' next route refresh
    try:
        wait_for(lambda: any(steps(t, since=down_at + 2 * ROUTE_REFRESH_S) for t in traces), timeout=30,
                 what="stage 0 steps while the coordinator is down", poll=0.25)
    except TimeoutError as err:
        raise fail_with_logs(err, workers) from None
    steps_while_down = sum(len(steps(t, since=down_at)) for t in traces)

    second = CoordinatorProcess(*args)
    try:
        back_at = time.time()
        for worker, worker_id, mark in zip(workers, ids, marks, strict=True):
            assert worker.wait_event("reachable", after=mark, timeout=30)["worker_id"] == worker_id
        after = second.swarm()
        # the registry came back intact: the same workers, once each, on the same stages, same plan
        assert sorted(w.worker_id for w in after.workers) == sorted(ids)
        assert {w.worker_id: w.stage_index for w in after.workers} == {w.worker_id: w.stage_index
                                                                       for w in before.workers}
        assert all(w.state == pb.WORKER_STATE_ACTIVE for w in after.workers)
        assert after.plan_version == before.plan_version
        assert after.progress.trained_tokens >= tokens_before
        # training continues and the new coordinator counts it
        wait_for(lambda: second.swarm().progress.trained_tokens > after.progress.trained_tokens
                 and any(steps(t, since=back_at) for t in traces), timeout=30, what="progress after the restart",
                 poll=0.25)
        assert second.swarm().plan_version == before.plan_version
        # nobody was handed a new assignment for the same stage
        for i, worker in enumerate(workers):
            assert len(worker.events("assigned")) == assigned[i], worker.events("assigned")
        print(f"{steps_while_down} steps while the coordinator was down")
        assert_survivors_leave_cleanly(workers, dead=set())
    finally:
        second.kill()
