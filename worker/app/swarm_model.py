"""The swarm's model as it is now, gathered from one live replica of each stage.

Each stage serves its parameters for download (worker.replicas.state_transfer); stages keep the
full model's parameter names, so the pieces slot into one `GPTJ` by name. Used to measure a
running swarm's validation loss (the local demo's summary, tests) without stopping it.
"""

from __future__ import annotations

import torch
from hivemind.p2p import P2P, PeerID

from configs.schema import RunConfig
from protos import swarmtrain_pb2 as pb
from worker.model.gptj import GPTJ
from worker.model.stage import StageModule
from worker.pipeline import Replica, StageClient
from worker.replicas import fetch_state

FETCH_TIMEOUT_S = 30.0


class GatherError(Exception):
    """A stage of the plan has no replica that gave its parameters."""


async def gather_model(p2p: P2P, swarm: pb.GetSwarmResponse, config: RunConfig, run_id: str) -> GPTJ:
    """A full model holding, for every planned stage, the parameters of one of its live replicas."""
    model = GPTJ(config.model)
    client = StageClient(p2p)
    loaded: set[str] = set()
    for stage in sorted(swarm.stages, key=lambda s: s.stage_index):
        module = StageModule(config.model, stage.layer_start, stage.layer_end)
        key = f"{run_id}.stage{stage.stage_index}.{stage.layer_start}-{stage.layer_end}"
        replicas = [Replica(PeerID.from_base58(w.peer_id), tuple(w.multiaddrs)) for w in swarm.workers
                    if w.stage_index == stage.stage_index and w.state == pb.WORKER_STATE_ACTIVE and w.peer_id]
        why = "no active replica"
        for replica in replicas:
            try:
                state = await fetch_state(client, replica, key, module, FETCH_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - any failure: try the next replica
                why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
                continue
            names = [name for name, _ in module.named_parameters()]
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, tensor in zip(names, state.tensors, strict=True):
                    params[name].copy_(tensor)
            loaded.update(names)
            break
        else:
            raise GatherError(f"stage {stage.stage_index} ({key}): {why}")
    missing = {name for name, _ in model.named_parameters()} - loaded
    if missing:
        raise GatherError(f"the plan's stages do not cover the model: {len(missing)} parameters missing, "
                          f"e.g. {min(missing)}")
    return model


async def validation_losses(swarm: pb.GetSwarmResponse, config: RunConfig) -> tuple[float, float]:
    """Validation loss on the held-out split of the seed's model and of the swarm's model now (CPU)."""
    from hivemind.p2p import P2P

    from worker.data.source import open_token_data
    from worker.model.gptj import init_parameters
    from worker.runtime.standalone import validation_loss

    training = config.training
    data = open_token_data(config.data, training.seq_len, training.seed)
    batches = data.validation_batches(training.micro_batch_size, training.eval_batches)
    seeded = GPTJ(config.model)
    init_parameters(seeded, training.seed, config.model.init_std)
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        trained = await gather_model(p2p, swarm, config, swarm.run_id)
    finally:
        await p2p.shutdown()
    cpu = torch.device("cpu")
    return validation_loss(seeded, batches, cpu, "fp32"), validation_loss(trained, batches, cpu, "fp32")
