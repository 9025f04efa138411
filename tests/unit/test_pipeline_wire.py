"""Tensors through the pipeline wire: exact or bounded round trips, chunking, and strict refusal."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from configs.codecs import CodecChoice
from tests.harness.loopback import loopback_peers
from worker.pipeline.errors import WireError
from worker.pipeline.wire import (
    FLOAT16,
    MEANSTD_16BIT,
    NONE,
    WIRE_CHUNK_BYTES,
    Payload,
    compression_for,
    decode_tensor,
    encode_tensor,
    narrow_ids,
    read_frames,
    request_frames,
    response_frames,
)

M = TypeVar("M", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)
DAEMON_MAX_MESSAGE = 4 * 1024**2


def over_the_wire(frames: Iterable[M]) -> list[M]:
    """Serialize and parse every frame, as the stream does."""
    return [type(f).FromString(f.SerializeToString()) for f in frames]


async def aiter_of(items: list[M]) -> AsyncIterator[M]:
    for item in items:
        yield item


def roundtrip(payload: Payload, codec: str, key: str = "stage.1") -> Payload:
    frames = over_the_wire(request_frames(key, payload, codec))
    received = asyncio.run(read_frames(aiter_of(frames), max_bytes=1 << 30))
    assert received is not None and received.key == key
    return received.payload


def hidden(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_codec_table() -> None:
    h, ids = hidden(2, 3, 8), torch.zeros(2, 3, dtype=torch.int64)
    assert compression_for(h, "none", "activation") == NONE
    assert compression_for(h, "float16", "activation") == FLOAT16
    assert compression_for(h, "float16", "raw") == NONE  # a codec's parts travel as they are
    assert compression_for(h, "float16", "gradient") == MEANSTD_16BIT
    assert compression_for(ids, "float16", "activation") == NONE  # token ids always travel exact
    with pytest.raises(ValueError, match="unknown codec 'gzip'"):
        compression_for(h, "gzip", "activation")


def test_codec_none_is_exact_for_floats_and_ids() -> None:
    h = hidden(4, 16, 32)
    ids = torch.randint(0, 50400, (4, 16))
    out = roundtrip(Payload([h, ids], meta={"codec": "none", "seed": 7}), "none")
    assert torch.equal(out.tensors[0], h) and out.tensors[0].dtype == torch.float32
    assert torch.equal(out.tensors[1], ids) and out.tensors[1].dtype == torch.int64
    assert out.meta == {"codec": "none", "seed": 7}


def test_float16_rounds_within_half_precision() -> None:
    h = hidden(4, 16, 32, scale=3.0)
    (out,) = roundtrip(Payload([h]), "float16").tensors
    assert out.dtype == torch.float32
    # fp16 keeps 11 significant bits: relative rounding error at most 2**-11
    assert torch.allclose(out, h, rtol=2**-11, atol=1e-7)


def test_gradients_keep_their_precision_at_small_scale() -> None:
    """A gradient averaged over a large batch is ~1e-6 per element: plain fp16 makes it subnormal."""
    g = hidden(4, 16, 64, scale=1e-6)
    as_activation = decode_tensor(encode_tensor(g, "float16", "activation"))
    as_gradient = decode_tensor(encode_tensor(g, "float16", "gradient"))

    def error(t: torch.Tensor) -> float:
        return ((t - g).norm() / g.norm()).item()

    assert error(as_gradient) < 2e-3  # per-row scaled fp16: ~fp16 precision at any scale
    assert error(as_activation) > 10 * error(as_gradient)


@pytest.mark.parametrize("codec", ["none", "float16"])
def test_a_tensor_over_the_daemon_limit_is_chunked(codec: str) -> None:
    big = hidden(6, 256, 1024)  # 6 MiB of fp32, over the daemon's 4 MiB message cap
    frames = over_the_wire(request_frames("stage.2", Payload([big], roles=["gradient"]), codec))
    assert len(frames) > 1
    assert max(f.ByteSize() for f in frames) < min(DAEMON_MAX_MESSAGE, WIRE_CHUNK_BYTES + 4096)
    received = asyncio.run(read_frames(aiter_of(frames), max_bytes=1 << 30))
    assert received is not None
    (out,) = received.payload.tensors
    if codec == "none":
        assert torch.equal(out, big)
    else:
        assert ((out - big).norm() / big.norm()).item() < 1e-3


@pytest.mark.parametrize("codec", ["none", "float16"])
def test_empty_batch_round_trips(codec: str) -> None:
    empty_hidden = torch.empty(0, 16, 32)
    empty_ids = torch.empty(0, 16, dtype=torch.int64)
    out = roundtrip(Payload([empty_hidden, empty_ids], roles=["gradient", "activation"]), codec).tensors
    assert out[0].shape == (0, 16, 32) and out[0].dtype == torch.float32
    assert out[1].shape == (0, 16) and out[1].dtype == torch.int64


def test_no_tensors_at_all() -> None:
    out = roundtrip(Payload(meta={"loss": 2.5}), "none")
    assert out.tensors == [] and out.meta == {"loss": 2.5}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_on_both_ends(bad: float) -> None:
    h = hidden(2, 4, 8)
    h[1, 2, 3] = bad
    for codec in ("none", "float16"):  # float16 would clamp an infinity into a finite lie
        with pytest.raises(WireError, match="NaN or infinite"):
            encode_tensor(h, codec)
    # a sender that skips the check (not this code) is still refused on receipt
    with pytest.raises(WireError, match="NaN or infinite"):
        decode_tensor(serialize_torch_tensor(h))


def test_inconsistent_tensors_are_refused() -> None:
    good = serialize_torch_tensor(hidden(2, 4, 8))
    short = runtime_pb2.Tensor()
    short.CopyFrom(good)
    short.buffer = good.buffer[:-4]
    with pytest.raises(WireError, match="needs 256 bytes, got 252"):
        decode_tensor(short)
    alien = runtime_pb2.Tensor()
    alien.CopyFrom(good)
    alien.dtype = "object"
    with pytest.raises(WireError, match="dtype 'object' is not accepted"):
        decode_tensor(alien)
    deep = serialize_torch_tensor(torch.zeros(1, 1, 1, 1, 1))
    with pytest.raises(WireError, match="5 dims"):
        decode_tensor(deep)


def test_framing_errors_are_refused() -> None:
    frames = over_the_wire(request_frames("k", Payload([hidden(64, 64, 64)]), "none", chunk_bytes=64 * 1024))
    with pytest.raises(WireError, match="announced 16 parts and arrived in 15"):
        asyncio.run(read_frames(aiter_of(frames[:-1]), max_bytes=1 << 30))
    with pytest.raises(WireError, match="continuation part arrived before any tensor"):
        asyncio.run(read_frames(aiter_of(frames[1:]), max_bytes=1 << 30))
    with pytest.raises(WireError, match="exceeds the limit of 100,000 bytes"):
        asyncio.run(read_frames(aiter_of(frames), max_bytes=100_000))
    not_json = runtime_pb2.ExpertRequest(uid="k", metadata=b"\xff{")
    with pytest.raises(WireError, match="not JSON"):
        asyncio.run(read_frames(aiter_of([not_json]), max_bytes=1 << 20))
    assert asyncio.run(read_frames(aiter_of([]), max_bytes=1 << 20)) is None


@pytest.mark.multiprocess  # two p2p daemons
def test_a_large_tensor_crosses_real_p2p_streams() -> None:
    """An echo stage on one daemon, a caller on another: 6 MiB each way through libp2p."""

    async def main() -> None:
        async with loopback_peers(2) as (server, caller):

            async def echo(requests: AsyncIterator[runtime_pb2.ExpertRequest], _: object):
                received = await read_frames(requests, max_bytes=1 << 30)
                assert received is not None
                payload = Payload([t * 2 for t in received.payload.tensors], meta={"key": received.key})
                for frame in response_frames(payload, "none"):
                    yield frame

            await server.add_protobuf_handler(
                "echo", echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )
            big = hidden(6, 256, 1024)

            async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
                for frame in request_frames("stage.1", Payload([big]), "none"):
                    yield frame

            stream = await caller.iterate_protobuf_handler(
                server.peer_id, "echo", requests(), runtime_pb2.ExpertResponse
            )
            received = await read_frames(stream, max_bytes=1 << 30)
            assert received is not None and received.payload.meta == {"key": "stage.1"}
            assert torch.equal(received.payload.tensors[0], big * 2)
            assert received.wire_bytes > big.numel() * 4

    asyncio.run(main())


def test_metadata_is_json() -> None:
    (frame,) = request_frames("k", Payload(meta={"codec": "float16"}), "float16")
    assert json.loads(frame.metadata) == {"codec": "float16", "tensor_count": 0} and frame.uid == "k"
    received = asyncio.run(read_frames(aiter_of([frame]), max_bytes=1 << 20))
    assert received is not None and received.payload.meta == {"codec": "float16"}  # the count is the wire's


def test_a_message_cut_at_a_frame_boundary_is_refused() -> None:
    # whole tensors of 64 KiB each, one per frame: a stream that closes early loses whole tensors,
    # which only the count in the first frame can tell from the end of the message
    tensors = [hidden(128, 128, seed=i) for i in range(3)]
    frames = over_the_wire(response_frames(Payload(tensors), "none", chunk_bytes=64 * 1024 + 64))
    assert len(frames) == 3
    with pytest.raises(WireError, match="cut short: 2 of 3 tensors arrived"):
        asyncio.run(read_frames(aiter_of(frames[:-1]), max_bytes=1 << 30))
    whole = asyncio.run(read_frames(aiter_of(frames), max_bytes=1 << 30))
    assert whole is not None and all(torch.equal(a, b) for a, b in zip(whole.payload.tensors, tensors, strict=True))


@pytest.mark.parametrize(("codec", "bound", "ratio"), [
    ("blockwise_8bit", 1 / 254, 0.27), ("blockwise_4bit", 1 / 14, 0.15), ("bfloat16", 2 ** -8, 0.51),
    (CodecChoice("blockwise_4bit", block_size=256), 1 / 14, 0.13),
])
def test_compressed_codecs_shrink_activations_and_gradients_within_their_bound(
        codec: str | CodecChoice, bound: float, ratio: float) -> None:
    acts, grads, ids = hidden(4, 64, 128, seed=1), hidden(4, 64, 128, scale=1e-6, seed=2), torch.ones(4, 64).long()
    payload = Payload([acts, grads, ids], meta={"seed": 3}, roles=["activation", "gradient", "activation"])
    plain = sum(f.ByteSize() for f in over_the_wire(request_frames("k", payload, "none")))
    frames = over_the_wire(request_frames("k", payload, codec))
    assert sum(f.ByteSize() for f in frames) < ratio * plain + 4096
    received = asyncio.run(read_frames(aiter_of(frames), max_bytes=1 << 30)).payload
    assert received.meta == {"seed": 3}  # the layout is the wire's business, not the caller's
    got_acts, got_grads, got_ids = received.tensors
    assert torch.equal(got_ids, ids)
    for got, sent in ((got_acts, acts), (got_grads, grads)):  # small gradients keep their precision too
        assert got.shape == sent.shape and got.dtype == torch.float32
        assert float((got - sent).abs().max()) <= bound * float(sent.abs().max()) * 1.01


def test_the_choice_s_block_size_reaches_the_wire() -> None:
    payload = Payload([hidden(4, 8, 128)])
    sizes = {}
    for block_size in (32, 64, 512):
        choice = CodecChoice("blockwise_8bit", block_size=block_size)
        frames = over_the_wire(request_frames("k", payload, choice))
        assert json.loads(frames[0].metadata)["layout"][0]["meta"]["block_size"] == block_size
        sizes[block_size] = sum(f.ByteSize() for f in frames)
    assert sizes[32] > sizes[64] > sizes[512]  # one fp32 scale per block
    named = over_the_wire(request_frames("k", payload, "blockwise_8bit"))  # a name takes the defaults
    assert json.loads(named[0].metadata)["layout"][0]["meta"]["block_size"] == CodecChoice().block_size


@pytest.mark.parametrize("codec", ["topk_4bit", "powersgd", CodecChoice("topk_4bit", topk_fraction=0.1)])
def test_codecs_that_cannot_carry_activations_are_refused(codec: str | CodecChoice) -> None:
    with pytest.raises(ValueError, match="cannot carry activations; valid: none, float16"):
        list(request_frames("k", Payload([hidden(4, 8, 128)]), codec))


def test_a_forged_layout_is_refused() -> None:
    frames = over_the_wire(request_frames("k", Payload([hidden(4, 8, 128)]), "blockwise_8bit"))
    meta = json.loads(frames[0].metadata)
    for forged in ([None], [{"parts": 9, "meta": meta["layout"][0]["meta"]}], "x",
                   [{"parts": 2, "meta": {**meta["layout"][0]["meta"], "shape": [4, 8, 129]}}]):
        frames[0].metadata = json.dumps({**meta, "layout": forged}).encode()
        with pytest.raises(WireError):
            asyncio.run(read_frames(aiter_of(frames), max_bytes=1 << 30))


def test_ids_travel_in_the_narrowest_integer_type_that_holds_them() -> None:
    byte_targets = torch.tensor([[0, 255, -100]])
    assert narrow_ids(byte_targets).dtype == torch.int16
    assert torch.equal(narrow_ids(byte_targets).long(), byte_targets)
    gptj_targets = torch.tensor([[50_399, 7]])
    assert narrow_ids(gptj_targets).dtype == torch.int32
    assert torch.equal(narrow_ids(gptj_targets).long(), gptj_targets)
    out = roundtrip(Payload([narrow_ids(byte_targets)]), "none")
    assert out.tensors[0].dtype == torch.int16 and torch.equal(out.tensors[0].long(), byte_targets)


def test_a_requests_codec_carries_its_block_size_to_the_called_stage() -> None:
    from configs.codecs import CodecChoice
    from worker.pipeline.stage_server import RequestRejected, _request_options
    from worker.pipeline.wire import codec_from_meta, codec_meta

    assert codec_meta("blockwise_4bit") == {"codec": "blockwise_4bit"}  # the default block: not sent
    choice = CodecChoice("blockwise_4bit", block_size=128)
    assert codec_meta(choice) == {"codec": "blockwise_4bit", "block_size": 128}
    assert codec_from_meta(codec_meta(choice)) == choice
    assert _request_options(codec_meta(choice), "peer").codec == choice
    for bad in (0, -1, 1 << 20, "64", 64.0, True):
        with pytest.raises(RequestRejected, match="block_size"):
            _request_options({"codec": "blockwise_8bit", "block_size": bad}, "peer")
    with pytest.raises(RequestRejected, match="unknown codec"):
        _request_options({"codec": "topk_9bit"}, "peer")


def test_narrowed_targets_of_a_large_vocabulary_pass_the_last_stages_check() -> None:
    """int16 targets (byte tokens) checked against GPT-J's 50,400 symbols: compared in int16 the
    vocabulary size wrapped negative and every target was refused."""
    from configs.loader import load_config
    from worker.model.stage import StageModule
    from worker.pipeline.checks import check_targets

    model = load_config("tiny").model.model_copy(update={"vocab_size": 50_400})
    stage = StageModule(model, 2, model.n_layer)
    hidden = torch.zeros(1, 3, model.d_model)
    targets = narrow_ids(torch.tensor([[10, 255, -100]]))
    assert targets.dtype == torch.int16
    assert torch.equal(check_targets(stage, targets, hidden, torch.device("cpu")), torch.tensor([[10, 255, -100]]))
