"""Checkpoints: a stage's file (worker.runtime.checkpoint_format) and the coordinator's store (coordinator.storage.checkpoints).

Worker side: what is saved comes back exactly (parameters, AdamW state, anchor, step, round, data
position), so the next optimizer step after a resume is the step the saved stage would have
taken; a stage of another split reads its layers from the files that hold them. Coordinator
side: parts are checked, a checkpoint is complete only once every stage is in, completion is
durable across a restart, the newest k are kept, and a crash mid-checkpoint leaves nothing.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from configs.loader import load_config
from coordinator.storage.checkpoints import (
    Checkpoint,
    CheckpointRefused,
    CheckpointStore,
    Part,
    PartWriter,
    stages_holding,
    upload_limit,
)
from coordinator.swarm.checkpoint_schedule import Abandon, Open, Rewrite, choose_writers, next_step
from protos import swarmtrain_pb2 as pb
from worker.model.gptj import lm_loss
from worker.model.stage import build_stage
from worker.replicas.diloco import OuterSettings, ReplicaSync
from worker.runtime.checkpoint_format import CheckpointMismatch, DataPosition, pack, resume, snapshot
from worker.runtime.standalone import build_optimizer

CONFIG = load_config("tiny")
MODEL, TRAINING = CONFIG.model, CONFIG.training


def trained_stage(start: int, end: int, steps: int = 3, seed: int = 0):  # noqa: ANN201 - a tuple of parts
    """A stage (of the whole model when it spans all layers) after a few AdamW steps."""
    stage = build_stage(MODEL, start, end, seed=TRAINING.seed)
    optimizer = build_optimizer(stage, TRAINING)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        if stage.is_first:
            x = torch.randint(0, MODEL.vocab_size, (2, 16), generator=gen)
        else:
            x = torch.randn(2, 16, MODEL.d_model, generator=gen)
        out = stage(x)
        loss = lm_loss(out, torch.randint(0, MODEL.vocab_size, (2, 16), generator=gen)) if stage.is_last \
            else out.square().mean()
        loss.backward()
        optimizer.step()
    sync = ReplicaSync(list(stage.parameters()), OuterSettings())
    sync.reset([p.detach() - 0.01 for p in stage.parameters()], 7,
               momentum=[torch.full_like(p, 0.5) for p in stage.parameters()])
    return stage, optimizer, sync


def request(checkpoint_id: int, stage: int, start: int, end: int) -> pb.CheckpointRequest:
    return pb.CheckpointRequest(checkpoint_id=checkpoint_id, stage_index=stage, layer_start=start, layer_end=end)


def fresh(start: int, end: int):  # noqa: ANN201
    stage = build_stage(MODEL, start, end, seed=TRAINING.seed + 1)  # another init: nothing equal by chance
    return stage, build_optimizer(stage, TRAINING), ReplicaSync(list(stage.parameters()), OuterSettings())


# ---- worker side ---------------------------------------------------------------------------


def on_disk(folder: Path, files: list[tuple[pb.CheckpointFile, bytes]]) -> list[tuple[pb.CheckpointFile, Path]]:
    """The files as a download leaves them: written to disk, read back tensor by tensor."""
    out = []
    for i, (header, blob) in enumerate(files):
        path = folder / f"part-{i:03d}.safetensors"
        path.write_bytes(blob)
        out.append((header, path))
    return out


def test_a_resumed_stage_takes_the_same_next_step_as_the_saved_one(tmp_path: Path) -> None:
    stage, optimizer, sync = trained_stage(0, 2)
    data = DataPosition(1, 2, 40)
    header, blob = pack(snapshot(stage, optimizer, sync), request(3, 0, 0, 2), step=3, round_number=sync.round,
                        data=data)
    assert header.size_bytes == len(blob) and len(header.sha256) == 64

    other, other_opt, other_sync = fresh(0, 2)
    resumed = resume(on_disk(tmp_path, [(header, blob)]), other, other_opt, other_sync)
    assert (resumed.checkpoint_id, resumed.step, resumed.round, resumed.data) == (3, 3, 7, data)
    for a, b in zip(stage.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(sync.anchor, other_sync.anchor, strict=True):
        assert torch.equal(a, b)
    assert other_sync.momentum is not None and all(torch.equal(m, torch.full_like(m, 0.5))
                                                   for m in other_sync.momentum)
    # same gradients on both: equal parameters afterwards only if Adam's moments and step came back
    for s, o in ((stage, optimizer), (other, other_opt)):
        o.zero_grad()
        s(torch.arange(32).reshape(2, 16) % MODEL.vocab_size).square().mean().backward()
        o.step()
    for a, b in zip(stage.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_stage_of_another_split_reads_its_layers_from_the_files_that_hold_them(tmp_path: Path) -> None:
    whole, _, _ = trained_stage(0, MODEL.n_layer)
    files = []
    for index, (start, end) in enumerate(((0, 1), (1, 3), (3, MODEL.n_layer))):
        part = build_stage(MODEL, start, end, seed=0)
        part.load_state_dict({k: v for k, v in whole.state_dict().items() if k in part.state_dict()})
        files.append(pack(snapshot(part, build_optimizer(part, TRAINING),
                                   ReplicaSync(list(part.parameters()), OuterSettings())),
                          request(5, index, start, end), step=10 + index, round_number=0, data=None))
    assert stages_holding([0, 1, 3, MODEL.n_layer], 1, MODEL.n_layer) == [1, 2]
    target, opt, sync = fresh(1, MODEL.n_layer)
    resumed = resume(on_disk(tmp_path, files[1:]), target, opt, sync)
    assert resumed.step == 11  # from the file holding the stage's first layer
    wanted = whole.state_dict()
    for name, p in target.named_parameters():
        assert torch.equal(p, wanted[name])


def test_a_checkpoint_of_another_model_leaves_the_stage_untouched(tmp_path: Path) -> None:
    stage, optimizer, sync = trained_stage(0, 2)
    header, blob = pack(snapshot(stage, optimizer, sync), request(1, 0, 0, 2), 3, 0, None)
    bigger = MODEL.model_copy(update={"d_model": MODEL.d_model * 2, "n_head": MODEL.n_head})
    target = build_stage(bigger, 0, 2, seed=0)
    before = [p.clone() for p in target.parameters()]
    with pytest.raises(CheckpointMismatch, match="another model"):
        resume(on_disk(tmp_path, [(header, blob)]), target, build_optimizer(target, TRAINING),
               ReplicaSync(list(target.parameters()), OuterSettings()))
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
    tampered = pb.CheckpointFile()
    tampered.CopyFrom(header)
    tampered.sha256 = "0" * 64
    with pytest.raises(CheckpointMismatch, match="sha256"):
        resume(on_disk(tmp_path, [(tampered, blob)]), *fresh(0, 2))


def test_data_position_keeps_the_share_of_an_epoch_when_the_shard_count_changes() -> None:
    assert DataPosition(0, 2, 100).start_for(2) == 100
    assert DataPosition(0, 2, 100).start_for(4) == 50
    assert DataPosition(1, 4, 30).start_for(1) == 120


# ---- coordinator side ----------------------------------------------------------------------


def store_at(tmp_path: Path, keep: int = 2, now: list[float] | None = None) -> CheckpointStore:
    clock = now or [1000.0]
    db = sqlite3.connect(tmp_path / "registry.sqlite3", isolation_level=None)
    return CheckpointStore(tmp_path / "checkpoints", db, keep, lambda: clock[0])


def stage_files(checkpoint_id: int, bounds: list[int]) -> list[tuple[pb.CheckpointFile, bytes]]:
    out = []
    for index in range(len(bounds) - 1):
        stage, optimizer, sync = trained_stage(bounds[index], bounds[index + 1], steps=1)
        out.append(pack(snapshot(stage, optimizer, sync), request(checkpoint_id, index, *bounds[index:index + 2]),
                        step=20 + index, round_number=0, data=None))
    return out


def upload(store: CheckpointStore, header: pb.CheckpointFile, blob: bytes, worker: str) -> bool:
    header = pb.CheckpointFile(worker_id=worker, **{f.name: v for f, v in header.ListFields()})
    start, end = header.layer_start, header.layer_end
    params = sum(p.numel() for p in build_stage(MODEL, start, end, seed=0).parameters())
    checkpoint = store.check_upload(header, upload_limit(params))
    writer = PartWriter(store.partial_dir(checkpoint.checkpoint_id), header)
    try:
        for at in range(0, len(blob), 1000):
            writer.write(blob[at:at + 1000])
        part = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return store.add_part(header.checkpoint_id, part)


def test_a_checkpoint_is_complete_once_every_stage_is_in_and_stays_so_across_a_restart(tmp_path: Path) -> None:
    bounds = [0, 2, MODEL.n_layer]
    store = store_at(tmp_path)
    checkpoint = store.open_checkpoint(bounds, {0: "w-a", 1: "w-b"}, trained_tokens=4096)
    assert store.request_for("w-a", 0) == request(checkpoint.checkpoint_id, 0, 0, 2)
    assert store.request_for("w-a", 1) is None and store.request_for("w-c", 0) is None
    files = stage_files(checkpoint.checkpoint_id, bounds)
    assert upload(store, *files[0], "w-a") is False
    assert store.latest is None and store.request_for("w-a", 0) is None  # written: not asked again
    assert upload(store, *files[1], "w-b") is True
    final = store.final_dir(checkpoint.checkpoint_id)
    manifest = json.loads((final / "manifest.json").read_text())
    assert [s["step"] for s in manifest["stages"]] == [20, 21] and manifest["trained_tokens"] == 4096
    assert not store.partial_dir(checkpoint.checkpoint_id).exists()

    again = store_at(tmp_path)
    assert again.latest is not None and again.latest.checkpoint_id == checkpoint.checkpoint_id
    got, chosen = again.files_for(2, MODEL.n_layer)
    assert [p.stage_index for p, _ in chosen] == [1] and chosen[0][1].read_bytes() == files[1][1]


def test_only_the_newest_k_are_kept_and_a_crash_mid_checkpoint_leaves_nothing(tmp_path: Path) -> None:
    bounds = [0, MODEL.n_layer]
    store = store_at(tmp_path, keep=2)
    for _ in range(3):
        c = store.open_checkpoint(bounds, {0: "w-a"}, 0)
        upload(store, *stage_files(c.checkpoint_id, bounds)[0], "w-a")
    assert [c.checkpoint_id for c in store.complete] == [2, 3]
    assert sorted(p.name for p in store.root.iterdir()) == ["000002", "000003"]
    c = store.open_checkpoint(bounds, {0: "w-a"}, 0)  # then the coordinator dies
    assert store.partial_dir(c.checkpoint_id).is_dir()
    after = store_at(tmp_path, keep=2)
    assert after.open is None and after.latest.checkpoint_id == 3
    assert not after.partial_dir(c.checkpoint_id).exists()
    assert after.next_id() == c.checkpoint_id + 1  # an abandoned id is never reused


def test_bad_uploads_are_refused_with_a_reason_and_leave_no_file(tmp_path: Path) -> None:
    bounds = [0, 2, MODEL.n_layer]
    store = store_at(tmp_path)
    c = store.open_checkpoint(bounds, {0: "w-a", 1: "w-b"}, 0)
    header, blob = stage_files(c.checkpoint_id, bounds)[0]

    def refused(code: str, worker: str = "w-a", data: bytes = blob, **changes: object) -> None:
        h = pb.CheckpointFile()
        h.CopyFrom(header)
        for k, v in changes.items():
            setattr(h, k, v)
        with pytest.raises(CheckpointRefused) as err:
            upload(store, h, data, worker)
        assert err.value.code == code, str(err.value)

    refused("PERMISSION_DENIED", worker="w-b")  # not the writer of stage 0
    refused("FAILED_PRECONDITION", checkpoint_id=c.checkpoint_id + 1)
    refused("INVALID_ARGUMENT", layer_end=1)  # not the stage's span
    refused("INVALID_ARGUMENT", size_bytes=10**12)  # beyond what the span can hold
    refused("DATA_LOSS", data=blob[:-1] + bytes([blob[-1] ^ 1]))
    refused("INVALID_ARGUMENT", data=blob + b"x")  # more than announced
    wrong_meta = stage_files(c.checkpoint_id + 5, bounds)[0]  # a file made for another checkpoint
    refused("INVALID_ARGUMENT", data=wrong_meta[1], size_bytes=wrong_meta[0].size_bytes,
            sha256=wrong_meta[0].sha256)
    assert list(store.partial_dir(c.checkpoint_id).iterdir()) == []
    assert upload(store, header, blob, "w-a") is False  # the good one still goes in


def test_writers_are_the_furthest_along_replica_of_each_stage() -> None:
    members = {0: [("w-b", 10), ("w-a", 10), ("w-c", 9)], 1: [("w-d", 3)]}
    assert choose_writers(members, 2) == {0: "w-a", 1: "w-d"}
    assert choose_writers(members, 3) is None  # stage 2 unserved: no checkpoint


def test_the_schedule_opens_a_checkpoint_when_due_and_watches_the_open_one() -> None:
    bounds, members = (0, 2, 4), {0: [("w-a", 5), ("w-b", 7)], 1: [("w-c", 1)]}

    def step(checkpoint: Checkpoint | None, now: float, *, boundaries: tuple[int, ...] | None = bounds,
             replicas: dict[int, list[tuple[str, int]]] = members, interval_s: float = 60.0):
        return next_step(checkpoint, boundaries, replicas, now=now, tried_at=100.0, interval_s=interval_s,
                         timeout_s=30.0)

    assert step(None, 159.0) is None  # not due yet
    assert step(None, 160.0) == Open({0: "w-b", 1: "w-c"})  # the furthest-along replica writes
    assert step(None, 160.0, boundaries=None) is None  # no plan
    assert step(None, 160.0, replicas={0: members[0]}) is None  # stage 1 unserved: its state would be missing
    assert step(None, 10_000.0, interval_s=0) is None  # checkpoints off

    open_one = Checkpoint(1, 160.0, bounds, 0, writers={0: "w-b", 1: "w-c"})
    assert step(open_one, 170.0) is None
    assert step(open_one, 170.0, boundaries=(0, 1, 4)) == Abandon("the plan changed while it was written",
                                                                  retry_now=True)
    open_one.parts[0] = Part(0, "w-b", 7, 10, "0" * 64)
    assert step(open_one, 191.0) == Abandon("stage(s) 1 not uploaded within 30s", retry_now=False)
    # a writer that went away before uploading is replaced; one whose part is in, or whose stage has
    # nobody left, is not
    assert step(open_one, 170.0, replicas={0: [("w-a", 5)], 1: [("w-d", 2)]}) == Rewrite({0: "w-b", 1: "w-d"})
    assert step(open_one, 170.0, replicas={0: [("w-a", 5)]}) is None
