"""A stage client and server count their wire bytes by payload kind where they encode and decode them:
activations and gradients add up to the bytes on the wire, a backward request's inputs count as
activations and its gradients as gradients, and the last stage hands its loss to `on_loss`."""

from __future__ import annotations

import asyncio

import pytest
import torch

from configs.loader import load_config
from tests.harness.loopback import loopback_peers
from worker.model.stage import build_stage
from worker.pipeline import StageClient, StageServer
from worker.runtime.standalone import build_optimizer

pytestmark = pytest.mark.multiprocess  # stages on p2pd daemons

CONFIG = load_config("tiny", ["model.n_layer=2", "training.batch_size=8", "training.micro_batch_size=4"])
D, V = CONFIG.model.d_model, CONFIG.model.vocab_size
KEY = "kinds.stage1.1-2"


@pytest.mark.parametrize("codec", ["none", "blockwise_8bit"])
def test_bytes_by_kind_add_up_to_the_wire_and_a_loss_reaches_on_loss(codec: str) -> None:
    async def main() -> None:
        async with loopback_peers(2) as (driver, served):
            losses: list[float] = []
            stage = build_stage(CONFIG.model, 1, 2, seed=0)
            server = StageServer(served, stage, KEY, lambda s: build_optimizer(s, CONFIG.training), 8,
                                 on_loss=losses.append)
            await server.start()
            client = StageClient(driver)
            client.add_addresses(served.peer_id, await served.get_visible_maddrs())
            hidden, targets = torch.randn(4, 16, D), torch.randint(0, V, (4, 16))
            await client.forward(served.peer_id, KEY, hidden, codec)
            after_forward = client.traffic.by_kind["activation"].sent
            loss, grad = await client.forward_backward(served.peer_id, KEY, hidden, targets, codec)
            await server.stop()

            assert losses == [loss] and grad is not None
            mine, theirs = client.traffic.by_kind, server.traffic.by_kind
            assert mine["activation"].sent == theirs["activation"].received > after_forward > 0
            assert mine["gradient"].received == theirs["gradient"].sent > 0
            assert mine["activation"].received == theirs["activation"].sent > 0  # forward's outputs
            out = sum(k.sent for k in client.traffic.by_kind.values())
            assert (out, sum(k.received for k in client.traffic.by_kind.values())) == \
                (client.stats.bytes_out, client.stats.bytes_in)
            # what the caller gave: fp32 hidden states twice, int64 targets once
            assert mine["activation"].uncompressed == 2 * hidden.numel() * 4 + targets.numel() * 8
    asyncio.run(main())


def test_a_backward_request_counts_its_inputs_as_activations_and_its_gradients_as_gradients() -> None:
    async def main() -> None:
        async with loopback_peers(2) as (driver, served):
            middle = build_stage(load_config("tiny", ["model.n_layer=3"]).model, 1, 2, seed=0)
            server = StageServer(served, middle, KEY, lambda s: build_optimizer(s, CONFIG.training), 8)
            await server.start()
            client = StageClient(driver)
            client.add_addresses(served.peer_id, await served.get_visible_maddrs())
            hidden, grads = torch.randn(4, 16, D), torch.randn(4, 16, D) * 1e-3
            await client.backward(served.peer_id, KEY, hidden, grads, "none")
            await server.stop()

            sent, got = client.traffic.by_kind, server.traffic.by_kind
            assert sent["activation"].sent == got["activation"].received
            assert sent["gradient"].sent == got["gradient"].received
            # fp32 tensors of the same shape: their shares differ by the metadata and framing only
            assert abs(sent["activation"].sent - sent["gradient"].sent) < 1024
            assert sent["activation"].sent + sent["gradient"].sent == client.stats.bytes_out
            assert sent["gradient"].received == got["gradient"].sent == client.stats.bytes_in
    asyncio.run(main())
