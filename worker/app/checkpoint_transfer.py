"""Moving a stage's checkpoint files to and from the coordinator, in chunks under its message limit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import grpc

from protos import swarmtrain_pb2 as pb
from protos import swarmtrain_pb2_grpc as pb_grpc
from worker.app.rpc_errors import CoordinatorError

CHECKPOINT_CHUNK_BYTES = 192 * 1024  # under the coordinator's 256 KiB message limit
CHECKPOINT_LOAD_TIMEOUT_S = 600.0


def transfer_timeout_s(size_bytes: int) -> float:
    """A deadline for moving a checkpoint file: a minute, plus its size at 1 MB/s."""
    return 60.0 + size_bytes / 1e6


def chunks_of(first: pb.CheckpointFile, data: bytes) -> Iterator[pb.CheckpointChunk]:
    """The file's header with its first chunk, then the rest of `data` chunk by chunk."""
    yield pb.CheckpointChunk(file=first, data=data[:CHECKPOINT_CHUNK_BYTES])
    for at in range(CHECKPOINT_CHUNK_BYTES, len(data), CHECKPOINT_CHUNK_BYTES):
        yield pb.CheckpointChunk(data=data[at : at + CHECKPOINT_CHUNK_BYTES])


async def upload_checkpoint(stub: pb_grpc.CoordinatorStub, header: pb.CheckpointFile, data: bytes,
                            worker_id: str, session_token: str) -> bool:
    """Upload one stage file of a checkpoint; True if it completed the checkpoint."""
    first = pb.CheckpointFile()
    first.CopyFrom(header)
    first.worker_id, first.session_token = worker_id, session_token
    reply = await stub.SaveCheckpoint(chunks_of(first, data), timeout=transfer_timeout_s(len(data)))
    return reply.complete


async def download_checkpoint(stub: pb_grpc.CoordinatorStub, request: pb.LoadCheckpointRequest,
                              folder: Path) -> list[tuple[pb.CheckpointFile, Path]]:
    """The newest complete checkpoint's files the request asks for, written into `folder` as they
    arrive (a stage file of a large model is gigabytes: it never sits in memory whole); [] if the
    coordinator has none yet."""
    files: list[tuple[pb.CheckpointFile, Path]] = []
    header: pb.CheckpointFile | None = None
    with contextlib.ExitStack() as stack:
        out: BinaryIO | None = None
        try:
            async for chunk in stub.LoadCheckpoint(request, timeout=CHECKPOINT_LOAD_TIMEOUT_S):
                if chunk.HasField("file"):
                    if header is not None and out is not None:
                        files.append((header, _whole(header, out)))
                    header = chunk.file
                    out = stack.enter_context(open(folder / f"part-{len(files):03d}.safetensors", "wb"))  # noqa: ASYNC230 - 192 KiB writes
                elif header is None or out is None:
                    raise CoordinatorError("the coordinator sent checkpoint data before naming its file")
                out.write(chunk.data)
                if out.tell() > header.size_bytes:
                    raise CoordinatorError(f"stage {header.stage_index}'s checkpoint file is longer than announced")
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        if header is not None and out is not None:
            files.append((header, _whole(header, out)))
    return files


def _whole(header: pb.CheckpointFile, out: BinaryIO) -> Path:
    out.flush()
    if out.tell() != header.size_bytes:
        raise CoordinatorError(f"stage {header.stage_index}'s checkpoint file arrived with {out.tell():,} of "
                               f"{header.size_bytes:,} bytes")
    return Path(out.name)
