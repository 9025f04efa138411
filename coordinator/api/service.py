"""gRPC servicer for swarmtrain.v1.Coordinator: validate, delegate to Swarm, convert."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError, Message

from configs.schema import RunConfig
from coordinator.api.rate_limit import RateLimiter, address_of
from coordinator.api.reachability import dial_back
from coordinator.api.validation import validate_heartbeat, validate_join, validate_leave
from coordinator.costs.model import JOULES_PER_KWH
from coordinator.storage.checkpoints import (
    CHUNK_BYTES,
    Checkpoint,
    CheckpointRefused,
    Part,
    PartWriter,
    checkpoint_info,
)
from coordinator.storage.pretrained_source import PretrainedSource
from coordinator.storage.registry import ACTIVE, BANNED, GONE, LEFT, REVOKED
from coordinator.swarm.forecast import expected_rate
from coordinator.swarm.orchestrator import Swarm
from coordinator.swarm.refusal import InvalidRequest
from protos import swarmtrain_pb2 as pb
from protos import swarmtrain_pb2_grpc as pb_grpc

_STATES = {ACTIVE: pb.WORKER_STATE_ACTIVE, GONE: pb.WORKER_STATE_GONE, LEFT: pb.WORKER_STATE_LEFT,
           BANNED: pb.WORKER_STATE_BANNED, REVOKED: pb.WORKER_STATE_REVOKED}


def public_config_json(config: RunConfig) -> str:
    """The run config a volunteer needs, without the operator's secrets."""
    return config.model_dump_json(exclude={"coordinator": {"join_token"}})


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, swarm: Swarm, pretrained: PretrainedSource | None = None) -> None:
        self.swarm = swarm
        self.pretrained = pretrained  # checkpoint 0, while the run has no complete checkpoint of its own
        self.config_json = public_config_json(swarm.config)
        c = swarm.config.coordinator
        self.joins = RateLimiter(c.join_rate_per_address, c.join_burst_per_address, swarm.clock)
        self._receiving: set[tuple[int, int]] = set()  # checkpoint parts being uploaded now
        self.data_url = ""  # where workers fetch prepared data: set once the metrics port is known
        self._probes: set[asyncio.Task] = set()  # dial-backs under way (coordinator/api/reachability.py)

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        address = address_of(context.peer())
        if not self.joins.allow(address):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many joins from {address}: retry in {self.joins.retry_after(address):.1f}s")
        try:
            validate_join(request)
            record, token = self.swarm.join(request, context.peer())
        except InvalidRequest as err:
            await _abort(context, err)
        probe = asyncio.create_task(self._dial_back(record.worker_id, list(request.profile.multiaddrs), address))
        self._probes.add(probe)
        probe.add_done_callback(self._probes.discard)
        config = self.swarm.config
        response = pb.JoinResponse(
            worker_id=record.worker_id,
            session_token=token,
            run_config_json=self.config_json,
            heartbeat_interval_s=config.coordinator.heartbeat_interval_s,
            run_id=config.coordinator.run_id,
            pretrained_fingerprint=self.pretrained.fingerprint if self.pretrained else "",
            data_url=self.data_url,
        )
        if record.stage_index >= 0:
            response.assignment.CopyFrom(self.swarm.assignment_for(record))
        else:
            response.status = self.swarm.note or "waiting for a stage"
        return response

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        try:
            validate_heartbeat(request)
            response = self.swarm.heartbeat(request)
        except InvalidRequest as err:
            await _abort(context, err)
        response.reachability = self.swarm.reachability.get(request.worker_id, pb.REACHABILITY_UNSPECIFIED)
        return response

    async def _dial_back(self, worker_id: str, multiaddrs: list[str], observed: str) -> None:
        self.swarm.reachability[worker_id] = pb.REACHABILITY_UNSPECIFIED  # a rejoin may announce other addresses
        verdict = self.swarm.reachability[worker_id] = await dial_back(multiaddrs, observed)
        record = self.swarm.registry.workers.get(worker_id)
        if verdict == pb.REACHABILITY_UNREACHABLE and record is not None and record.stage_index > 0:
            self.swarm.replan()  # nobody can dial it: it may drive stage 0, never serve a later stage

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        try:
            validate_leave(request)
            self.swarm.leave(request)
        except InvalidRequest as err:
            await _abort(context, err)
        return pb.LeaveResponse()

    async def GetSwarm(self, request: pb.GetSwarmRequest, context: grpc.aio.ServicerContext) -> pb.GetSwarmResponse:
        return swarm_view(self.swarm)

    async def SaveCheckpoint(self, requests: AsyncIterator[pb.CheckpointChunk],
                             context: grpc.aio.ServicerContext) -> pb.SaveCheckpointResponse:
        store = self.swarm.checkpoints
        first = await anext(aiter(requests), None)
        if first is None or not first.HasField("file"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk must name the file it starts")
        header = first.file
        try:
            limit = self.swarm.authorize_checkpoint_transfer(header.worker_id, header.session_token, header.layer_start,
                                                 header.layer_end)
            store.check_upload(header, limit)
            key = (header.checkpoint_id, header.stage_index)
            if key in self._receiving:  # a retry racing the first attempt
                raise CheckpointRefused("ALREADY_EXISTS", f"stage {header.stage_index} of checkpoint "
                                        f"{header.checkpoint_id} is being uploaded already")
            self._receiving.add(key)
            try:
                writer = await asyncio.to_thread(PartWriter, store.partial_dir(header.checkpoint_id), header)
                try:
                    if first.data:
                        await asyncio.to_thread(writer.write, first.data)
                    async for chunk in requests:
                        if chunk.HasField("file"):
                            raise CheckpointRefused("INVALID_ARGUMENT", "one file per upload")
                        await asyncio.to_thread(writer.write, chunk.data)
                    part = await asyncio.to_thread(writer.finish)
                except BaseException:
                    await asyncio.to_thread(writer.abort)
                    raise
            finally:
                self._receiving.discard(key)
            complete = store.add_part(header.checkpoint_id, part)
        except (InvalidRequest, CheckpointRefused) as err:
            await _abort(context, err)
        if complete:
            checkpoint = store.latest
            assert checkpoint is not None
            print(f"checkpoint {checkpoint.checkpoint_id} complete: {checkpoint.num_stages} stage(s), "
                  f"{checkpoint.size_bytes / 1e6:,.1f} MB, at {checkpoint.trained_tokens:,} trained tokens", flush=True)
        return pb.SaveCheckpointResponse(complete=complete)

    async def LoadCheckpoint(self, request: pb.LoadCheckpointRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.CheckpointChunk]:
        try:
            self.swarm.authorize_checkpoint_transfer(request.worker_id, request.session_token, request.layer_start,
                                         request.layer_end)
            checkpoint, parts = self.swarm.checkpoints.files_for(request.layer_start, request.layer_end)
            files = [(file_header(checkpoint, part), path) for part, path in parts]
        except CheckpointRefused as err:
            if err.code != "NOT_FOUND" or self.pretrained is None or request.has_pretrained:
                await _abort(context, err)
            files = []  # checkpoint 0: the pretrained weights, a file per layer
            for layer in range(request.layer_start, request.layer_end):
                files.append(await asyncio.to_thread(self.pretrained.layer_file, layer))
        except InvalidRequest as err:
            await _abort(context, err)
        for header, path in files:
            yield pb.CheckpointChunk(file=header)
            with open(path, "rb") as f:  # an open file survives the checkpoint being pruned meanwhile
                while data := await asyncio.to_thread(f.read, CHUNK_BYTES):
                    yield pb.CheckpointChunk(data=data)


def file_header(checkpoint: Checkpoint, part: Part) -> pb.CheckpointFile:
    """What announces a stored stage file on LoadCheckpoint's stream."""
    start, end = checkpoint.span(part.stage_index)
    return pb.CheckpointFile(checkpoint_id=checkpoint.checkpoint_id, stage_index=part.stage_index, layer_start=start,
                             layer_end=end, size_bytes=part.size_bytes, sha256=part.sha256)


def swarm_view(swarm: Swarm) -> pb.GetSwarmResponse:
    config, progress, generation = swarm.config, swarm.registry.progress, swarm.ledger.generation
    response = pb.GetSwarmResponse(
        generation=generation.number,
        run_id=config.coordinator.run_id,
        config_hash=swarm.config_hash,
        plan_version=swarm.plan_version,
        planner_note=swarm.note,
        progress=pb.Progress(
            trained_tokens=progress.trained_tokens,
            total_tokens=config.training.total_tokens,
            last_loss=progress.last_loss if progress.loss_count else 0.0,
            tokens_per_second=swarm.swarm_rate(),
            expected_tokens_per_second=expected_rate(swarm),
            measured_tokens_per_second=swarm.measured_tokens_per_second(),
            traffic=[swarm.traffic[kind] for kind in sorted(swarm.traffic)],
            rollbacks=sum(generation.rollbacks.values()),
            rolled_back_tokens=generation.rolled_back_tokens,
            usd_per_hour=swarm.cost.rates.usd_per_hour,
            usd_spent=swarm.cost.usd,
            kwh_used=swarm.cost.joules / JOULES_PER_KWH,
        ),
    )
    if swarm.checkpoints.latest is not None:
        response.last_checkpoint.CopyFrom(checkpoint_info(swarm.checkpoints.latest))
    if swarm.plan:
        bounds = swarm.plan.boundaries
        for stage in range(swarm.plan.num_stages):
            response.stages.add(
                stage_index=stage,
                layer_start=bounds[stage],
                layer_end=bounds[stage + 1],
                active_workers=sum(1 for r in swarm.registry.active() if r.stage_index == stage),
                planned_tokens_per_second=swarm.plan.stage_rates[stage],
            )
    for record in sorted(swarm.registry.workers.values(), key=lambda r: r.worker_id):
        profile = swarm.worker_profile(record)
        response.workers.add(
            worker_id=record.worker_id,
            public_name=profile.public_name,
            state=_STATES[record.state],
            stage_index=record.stage_index,
            gpu_name=profile.gpu_name,
            achieved_flops=profile.achieved_flops,
            tokens_per_second=record.tokens_per_second,
            last_heartbeat_unix=record.last_heartbeat_unix,
            peer_id=profile.peer_id,
            multiaddrs=list(profile.multiaddrs),
            serves_state=swarm.serves_state(record),
            tokens_total=record.tokens_total,
            reachability=swarm.reachability.get(record.worker_id, pb.REACHABILITY_UNSPECIFIED),
            joined_unix=record.joined_unix,
        )
    return response


async def _abort(context: grpc.aio.ServicerContext, err: InvalidRequest | CheckpointRefused) -> None:
    await context.abort(getattr(grpc.StatusCode, err.code), str(err))


def strict_handlers(service: CoordinatorService) -> grpc.GenericRpcHandler:
    """The Coordinator service's handlers, parsing requests themselves: bytes that are not a valid
    request message get INVALID_ARGUMENT naming the message type (grpc.aio's own parsing answers
    them with UNKNOWN and a Python exception name)."""
    handlers = {}
    serialize = _serialize
    for method in pb.DESCRIPTOR.services_by_name["Coordinator"].methods:
        request_type = getattr(pb, method.input_type.name)
        servicer_method = getattr(service, method.name)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _parsing_stream(servicer_method, request_type), response_serializer=serialize)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _parsing_to_stream(servicer_method, request_type), response_serializer=serialize)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _parsing(servicer_method, request_type),
                request_deserializer=None,  # raw bytes: parsed in the handler
                response_serializer=serialize,
            )
    return grpc.method_handlers_generic_handler(pb.DESCRIPTOR.services_by_name["Coordinator"].full_name, handlers)


def _serialize(response: Message) -> bytes:
    return response.SerializeToString()


async def _parse(raw: bytes, request_type: type[Message], context: grpc.aio.ServicerContext) -> Message:
    try:
        return request_type.FromString(raw)
    except DecodeError:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"not a valid {request_type.DESCRIPTOR.full_name} message")
        raise  # not reached: abort raises


def _parsing(method, request_type):  # noqa: ANN001, ANN202 - a servicer method and a message class
    async def handle(raw: bytes, context: grpc.aio.ServicerContext):  # noqa: ANN202 - the method's response
        return await method(await _parse(raw, request_type, context), context)

    return handle


def _parsing_stream(method, request_type):  # noqa: ANN001, ANN202 - a servicer method and a message class
    async def handle(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext):  # noqa: ANN202
        async def parsed() -> AsyncIterator[Message]:
            async for raw in raws:
                yield await _parse(raw, request_type, context)

        return await method(parsed(), context)

    return handle


def _parsing_to_stream(method, request_type):  # noqa: ANN001, ANN202 - a servicer method and a message class
    async def handle(raw: bytes, context: grpc.aio.ServicerContext):  # noqa: ANN202 - the responses
        async for response in method(await _parse(raw, request_type, context), context):
            yield response

    return handle
