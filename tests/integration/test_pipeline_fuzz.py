"""Hostile frames to a live stage over real P2P: random metadata, dtypes, shapes and bytes.

Every request must be answered (an error in the reply's metadata, or a well-formed result) or
its stream closed, never hang the stage, and never change its parameters. The stage must serve
a good request afterwards. The number of inputs tried is printed.
"""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
import torch
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs.loader import load_config
from tests.harness.loopback import loopback_peers
from worker.model.stage import build_stage
from worker.pipeline import StageClient, StageServer
from worker.pipeline.wire import handler_name, read_frames
from worker.runtime.standalone import build_optimizer

pytestmark = pytest.mark.multiprocess  # stages on p2pd daemons

CONFIG = load_config("tiny", ["model.n_layer=3", "training.batch_size=8", "training.micro_batch_size=4"])
KEY = "fuzz.stage1"
DTYPES = ["float32", "float16", "bfloat16", "int64", "int32", "uint8", "float64", "bool", "", "garbage"]
COMPRESSIONS = [0, 1, 2, 3, 4, 5, 99]

tensor_parts = st.builds(
    lambda dtype, size, buffer, compression, chunks: runtime_pb2.Tensor(
        dtype=dtype, size=size, buffer=buffer, compression=compression, chunks=chunks),
    st.sampled_from(DTYPES), st.lists(st.integers(0, 300), max_size=5), st.binary(max_size=4096),
    st.sampled_from(COMPRESSIONS), st.integers(0, 3))
frames = st.lists(st.builds(
    lambda uid, metadata, tensors: runtime_pb2.ExpertRequest(uid=uid, metadata=metadata, tensors=tensors),
    st.one_of(st.just(KEY), st.text(max_size=20)),
    st.one_of(st.binary(max_size=256), st.just(b'{"codec":"none"}'), st.just(b'{"layout":[{"parts":2}]}')),
    st.lists(tensor_parts, max_size=4)), min_size=1, max_size=3)


def test_random_frames_never_break_a_stage() -> None:
    tried = 0

    async def main() -> None:
        nonlocal tried
        async with loopback_peers(2) as (caller, host):
            server = await StageServer(host, build_stage(CONFIG.model, 1, 2, 0), KEY,
                                       partial(build_optimizer, training=CONFIG.training),
                                       CONFIG.training.batch_size, max_tokens=4 * 64).start()
            before = {k: v.clone() for k, v in server.stage.state_dict().items()}
            loop = asyncio.get_running_loop()

            async def send(method: str, request_frames: list[runtime_pb2.ExpertRequest]) -> None:
                async def source():  # noqa: ANN202 - an async generator of frames
                    for frame in request_frames:
                        yield frame
                try:
                    stream = await caller.iterate_protobuf_handler(
                        host.peer_id, handler_name(KEY, method), source(), runtime_pb2.ExpertResponse)
                    await asyncio.wait_for(read_frames(stream, max_bytes=1 << 26), timeout=20)
                except asyncio.TimeoutError:
                    raise AssertionError(f"{method} hung on {request_frames!r:.300}") from None
                except Exception:  # noqa: BLE001, S110 - a refusal or a closed stream is the point
                    pass

            @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
            @given(method=st.sampled_from(["forward", "backward", "forward_backward", "state"]), body=frames)
            def fuzz(method: str, body: list[runtime_pb2.ExpertRequest]) -> None:
                nonlocal tried
                tried += 1
                asyncio.run_coroutine_threadsafe(send(method, body), loop).result(60)

            await asyncio.to_thread(fuzz)
            after = server.stage.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)  # nothing reached the parameters
            hidden = torch.randn(2, 16, CONFIG.model.d_model)
            out = await StageClient(caller).forward(host.peer_id, KEY, hidden, "none", 20)
            assert out.shape == hidden.shape  # and it still serves
            await server.stop()

    asyncio.run(main())
    print(f"\npipeline fuzz: {tried:,} inputs tried")
