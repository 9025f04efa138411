"""Bad requests to a stage over P2P are refused with a clear reason, and never touch its parameters."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from functools import partial

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from configs.loader import load_config
from tests.harness.loopback import loopback_peers
from worker.model.stage import build_stage
from worker.pipeline import (
    ReplicaPicker,
    RequestRejected,
    StageClient,
    StageServer,
    WireError,
    call_with_failover,
)
from worker.pipeline.wire import handler_name, read_frames
from worker.runtime.standalone import build_optimizer

pytestmark = pytest.mark.multiprocess  # stages on p2pd daemons

CONFIG = load_config("tiny", ["model.n_layer=3", "training.batch_size=8", "training.micro_batch_size=4"])
D, V, N_CTX = CONFIG.model.d_model, CONFIG.model.vocab_size, CONFIG.model.n_ctx
MAX_TOKENS = 4 * 64


def h(*shape: int, fill: float | None = None) -> torch.Tensor:
    return torch.full(shape, fill) if fill is not None else torch.randn(*shape)


def ids(*shape: int, last: int | None = None) -> torch.Tensor:
    """Random token ids; `last` overrides the final one (to put one bad value in a good tensor)."""
    t = torch.randint(0, V, shape)
    if last is not None:
        t.view(-1)[-1] = last
    return t


# (stage, method, tensors, expected message): every one of these must be refused
CASES = [
    (
        "middle",
        "forward",
        [h(4, 64, D - 1)],
        rf"takes float hidden states \(B, T, {D}\); got torch.float32 \(4, 64, {D - 1}\)",
    ),
    ("middle", "forward", [ids(4, 64)], r"takes float hidden states"),
    ("middle", "forward", [h(1, N_CTX + 1, D)], rf"sequence length {N_CTX + 1} exceeds n_ctx={N_CTX}"),
    ("middle", "forward", [h(8, 64, D)], r"512 tokens in one request \(this stage takes at most 256\)"),
    ("middle", "forward", [h(0, 64, D)], r"empty batch \(0, 64, 128\)"),
    ("middle", "backward", [h(4, 64, D), h(4, 32, D)], rf"grad_outputs must be float \(4, 64, {D}\)"),
    ("middle", "forward_backward", [h(4, 64, D), ids(4, 64)], r"served by the last stage only"),
    ("last", "forward_backward", [h(4, 64, D), ids(4, 64, last=V)], rf"targets must lie in \[0, {V}\)"),
    ("last", "forward_backward", [h(4, 64, D), torch.full((4, 64), -100)], r"every target is -100"),
    ("last", "forward_backward", [h(4, 64, D), ids(4, 63)], r"targets must be int64 \(4, 64\)"),
    ("first", "forward", [ids(2, 8, last=-1)], rf"token ids must lie in \[0, {V}\)"),
    ("first", "forward", [h(2, 8, D)], r"the first stage takes int64 token ids"),
]


async def raw_call(caller: P2P, peer: P2P, key: str, method: str, request: runtime_pb2.ExpertRequest) -> dict:
    """Send hand-made frames, as a buggy or hostile peer could, and return the answer's metadata."""

    async def frames() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        yield request

    stream = await caller.iterate_protobuf_handler(
        peer.peer_id, handler_name(key, method), frames(), runtime_pb2.ExpertResponse
    )
    received = await read_frames(stream, max_bytes=1 << 30)
    assert received is not None
    return received.payload.meta


def test_bad_requests_are_refused_and_leave_the_stage_untouched() -> None:
    training = CONFIG.training
    optimizer = partial(build_optimizer, training=training)

    async def main() -> None:
        async with loopback_peers(2) as (caller, host):
            servers = {
                name: await StageServer(
                    host,
                    build_stage(CONFIG.model, start, end, 0),
                    f"bad.{name}",
                    optimizer,
                    training.batch_size,
                    max_tokens=MAX_TOKENS,
                ).start()
                for name, (start, end) in {"first": (0, 1), "middle": (1, 2), "last": (2, 3)}.items()
            }
            before = {
                name: {k: v.clone() for k, v in s.stage.state_dict().items()} for name, s in servers.items()
            }
            client = StageClient(caller)

            def refusals() -> int:
                return sum(s.stats.rejected for s in servers.values())

            async def call(stage: str, method: str, tensors: list[torch.Tensor]) -> object:
                key = f"bad.{stage}"
                return await getattr(client, method)(host.peer_id, key, *tensors, "none", 10.0)

            for stage, method, tensors, expected in CASES:
                with pytest.raises(RequestRejected, match=expected) as caught:
                    await call(stage, method, tensors)
                assert caught.value.kind == "bad_request"
            assert refusals() == len(CASES)

            # finite inputs whose forward overflows: the gradient would be NaN, so nothing is accumulated
            with pytest.raises(
                RequestRejected, match="gradient is not finite; nothing was accumulated"
            ) as caught:
                await call("middle", "backward", [h(2, 8, D, fill=3e38), h(2, 8, D)])
            assert caught.value.kind == "non_finite"
            with pytest.raises(RequestRejected, match="outputs are not finite") as caught:
                await call("middle", "forward", [h(2, 8, D, fill=3e38)])
            assert caught.value.kind == "non_finite"
            assert refusals() == len(CASES) + 2

            # the client refuses to send NaN; a peer that sends it anyway is refused by the stage
            with pytest.raises(WireError, match="NaN or infinite"):
                await call("middle", "forward", [h(2, 8, D, fill=float("nan"))])
            assert refusals() == len(CASES) + 2  # never sent
            nan = serialize_torch_tensor(h(2, 8, D, fill=float("nan")))
            meta = await raw_call(
                caller,
                host,
                "bad.middle",
                "forward",
                runtime_pb2.ExpertRequest(uid="bad.middle", tensors=[nan]),
            )
            assert meta["error"]["kind"] == "bad_request" and "NaN or infinite" in meta["error"]["message"]

            good = serialize_torch_tensor(h(2, 8, D))
            for request, expected in [
                (
                    runtime_pb2.ExpertRequest(uid="bad.other", tensors=[good]),
                    "serves 'bad.middle', not 'bad.other'",
                ),
                (
                    runtime_pb2.ExpertRequest(uid="bad.middle", tensors=[good, good]),
                    "forward takes [inputs]; got 2",
                ),
                (
                    runtime_pb2.ExpertRequest(uid="bad.middle", tensors=[good], metadata=b'{"codec": "zip"}'),
                    "unknown codec 'zip'",
                ),
                (
                    runtime_pb2.ExpertRequest(uid="bad.middle", tensors=[good], metadata=b'{"seed": -1}'),
                    "seed must be an integer",
                ),
                (
                    runtime_pb2.ExpertRequest(uid="bad.middle", tensors=[good], metadata=b'{"step": [1, 2]}'),
                    "step must be [session, step, attempt]",
                ),
            ]:
                meta = await raw_call(caller, host, "bad.middle", "forward", request)
                assert expected in meta["error"]["message"]

            # larger than any legitimate request: refused while it is still arriving
            with pytest.raises(RequestRejected, match="exceeds the limit"):
                await call("middle", "forward", [h(16, 256, D)])

            # a refusal is not retried on another replica: every replica would refuse it
            picker = ReplicaPicker(rng=random.Random(0))
            attempts: list[object] = []

            async def refused(peer: object) -> object:
                attempts.append(peer)
                return await call("middle", "forward", [h(4, 64, D - 1)])

            with pytest.raises(RequestRejected):
                await call_with_failover([host.peer_id, caller.peer_id], refused, picker=picker)
            assert len(attempts) == 1 and not picker.cooling_down(host.peer_id)

            for name, server in servers.items():
                for key, value in server.stage.state_dict().items():
                    assert torch.equal(value, before[name][key]), f"{name}: {key} changed"
                assert all(p.grad is None for p in server.stage.parameters()), name
                assert server.stats.samples == 0 and server.stats.steps == 0 and server.stats.in_flight == 0
            assert refusals() == len(CASES) + 2 + 1 + 5 + 1 + 1  # + NaN, hand-made, too large, refused

            # and the stages still serve good requests
            out = await call("middle", "forward", [h(2, 8, D)])
            assert out.shape == (2, 8, D)
            loss, grad = await call("last", "forward_backward", [h(2, 8, D), ids(2, 8)])
            assert loss > 0 and grad.shape == (2, 8, D) and servers["last"].stats.samples == 2
            no_grad = await call("first", "backward", [ids(2, 8), h(2, 8, D)])
            assert no_grad is None  # token ids have no gradient

    asyncio.run(main())
