"""A pipeline of stages on loopback P2P peers, built in this process from one run config's seed:
stage 0 on the first peer (the PipelineDriver's), stage k served on peer k."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from hivemind.p2p import P2P

from configs.loader import load_config
from configs.schema import RunConfig
from worker.model.schedule import learning_rate_at
from worker.model.stage import StageModule, build_stage, split_layers
from worker.pipeline import PipelineDriver, Replica, Route, StageClient, StageRoute, StageServer
from worker.runtime.standalone import build_optimizer

# per-stage clipping differs from local training's global clipping, so parity runs unclipped
PARITY_CONFIG = load_config(
    "tiny",
    [
        "model.n_layer=3",
        "training.seq_len=64",
        "training.micro_batch_size=4",
        "training.batch_size=8",
        "training.grad_clip=null",
        "training.warmup_steps=0",
        "data.max_corpus_bytes=300000",
    ],
)
MICROBATCHES_PER_STEP = PARITY_CONFIG.training.batch_size // PARITY_CONFIG.training.micro_batch_size


@dataclass
class Pipeline:
    driver: PipelineDriver
    servers: list[StageServer]

    @property
    def stages(self) -> list[StageModule]:
        return [self.driver.stage] + [s.stage for s in self.servers]


async def serve_pipeline(
    peers: list[P2P], config: RunConfig, prefix: str, **driver_options: object
) -> Pipeline:
    """Stage 0 on peers[0] (the driver), stage k on peers[k], all initialised from the run seed."""
    training = config.training
    spans = split_layers(config.model.n_layer, len(peers))
    stages = [build_stage(config.model, start, end, training.seed) for start, end in spans]
    optimizer = partial(build_optimizer, training=training)
    lr_at = partial(learning_rate_at, training=training)
    servers, routes = [], []
    for index, (peer, stage) in enumerate(zip(peers[1:], stages[1:], strict=True), start=1):
        key = f"{prefix}.stage{index}"
        servers.append(
            await StageServer(peer, stage, key, optimizer, training.batch_size, lr_at=lr_at).start()
        )
        replica = Replica(peer.peer_id, tuple(await peer.get_visible_maddrs()))
        routes.append(StageRoute(index, key, (replica,)))
    driver = PipelineDriver(
        StageClient(peers[0]),
        stages[0],
        optimizer(stages[0]),
        Route(tuple(routes)),
        batch_size=training.batch_size,
        lr_at=lr_at,
        timeout_s=30.0,
        seed=training.seed,
        **driver_options,
    )
    return Pipeline(driver, servers)
