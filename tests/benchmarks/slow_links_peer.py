"""One data-parallel peer of the slow-links benchmark: a preset's GPT-J under hivemind.Optimizer.

    python tests/benchmarks/slow_links_peer.py --mode a --index 0 --peers 2 --host 10.77.0.2 \
        --log peer0.jsonl --addr-file dht0.txt
    python tests/benchmarks/slow_links_peer.py --mode a --index 1 --peers 2 --host 10.77.0.3 \
        --log peer1.jsonl --initial-peer "$(cat dht0.txt)"

Modes (bench_slow_links.py runs each peer in its own network namespace):
  a  plain data parallel: the optimizer steps on fp32 gradients averaged every local step
     (target batch = the peers' per-step batches summed, no compression);
  b  hivemind as users run it: a 512-sequence target batch, fp16 gradients, other defaults.

The model, data, initial weights, AdamW settings and learning-rate schedule (by tokens
trained) are the --preset's (default tiny), as a swarmtrain worker uses them. Writes JSON
lines to --log: {"t", "tokens", "together", "alone"} after every local step (this peer's
tokens; its optimizer's averaging rounds so far, with other peers and without) and, on peer 0,
{"t", "val"} every --eval-every seconds. Runs until SIGTERM or --seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SEQUENCES_PER_STEP = 16  # each local step: 16 sequences of 128 tokens, as a swarm worker's batch
TARGET_BATCH_B = 512


STOP = threading.Event()


def _stop(*_: object) -> None:
    # only a flag: an exception raised here would land in whichever event-loop callback runs
    STOP.set()


class AveragingOutcomes(logging.Handler):
    """Counts hivemind.Optimizer's gradient-averaging rounds by outcome. Its status lines
    (verbose=True) are the only place it says whether a round averaged with other peers or the
    peer went on alone: a run whose peers never met is not data parallel, whatever it trained.
    Every optimizer step begins with one line; those that averaged with others say so (the
    others end in several ways, some silently), so alone = begun - together."""

    BEGUN = "Beginning optimizer step #"
    TOGETHER = re.compile(r"^Averaged gradients with (\d+) peers")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.begun = 0
        self.together = 0

    @property
    def alone(self) -> int:
        return max(0, self.begun - self.together)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        found = self.TOGETHER.search(message)
        if message.startswith(self.BEGUN):
            self.begun += 1
        elif found is not None and int(found.group(1)) > 1:
            self.together += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slow_links_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("a", "b"), required=True)
    parser.add_argument("--index", type=int, required=True, help="this peer's data shard, 0-based")
    parser.add_argument("--peers", type=int, default=2, help="peers in the run (shards, and mode a's batch)")
    parser.add_argument("--host", required=True, help="address the DHT and averager listen on")
    parser.add_argument("--initial-peer", help="multiaddr of peer 0's DHT")
    parser.add_argument("--addr-file", type=Path, help="write this peer's DHT multiaddr here once listening")
    parser.add_argument("--go-file", type=Path, help="once ready, wait for this file before training")
    parser.add_argument("--log", type=Path, required=True, help="JSON lines: steps and validation losses")
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long at the latest")
    parser.add_argument("--eval-every", type=float, default=8.0, help="seconds between validation losses")
    parser.add_argument("--preset", default="tiny", help="the run config preset: model, data, schedule")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)

    import hivemind
    import torch
    from hivemind.compression import Float16Compression, NoCompression

    from configs.loader import load_config
    from worker.data.tokens import TokenData
    from worker.model.gptj import GPTJ, init_parameters, lm_loss
    from worker.model.schedule import learning_rate_at
    from worker.runtime.standalone import validation_loss

    torch.set_num_threads(1)  # the benchmark's processes share few cores
    config = load_config(args.preset)
    training = config.training
    tokens_per_step = SEQUENCES_PER_STEP * training.seq_len
    data = TokenData(config.data, training.seq_len, training.seed)
    micro = training.micro_batch_size
    accumulation = SEQUENCES_PER_STEP // micro
    batches = data.train_batches(micro, args.index, args.peers)
    val_batches = data.validation_batches(micro, training.eval_batches)
    torch.manual_seed(training.seed)
    model = GPTJ(config.model)
    init_parameters(model, training.seed, config.model.init_std)

    if args.mode == "a":
        target = SEQUENCES_PER_STEP * args.peers  # every local step completes a global batch
        extra: dict[str, Any] = {
            "grad_compression": NoCompression(),
            # plain DP at its best: average as soon as all peers are in, never wait for stragglers
            "matchmaking_time": 5.0,
            "averager_opts": {"target_group_size": args.peers},
        }
    else:
        target = TARGET_BATCH_B
        extra = {"grad_compression": Float16Compression()}

    def lr_factor(epoch: int) -> float:
        # the preset's schedule, indexed by tokens trained rather than optimizer steps
        step = epoch * target * training.seq_len // tokens_per_step
        return learning_rate_at(step, training) / training.learning_rate

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": training.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    initial_peers = [args.initial_peer] if args.initial_peer else []
    dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{args.host}/tcp/0"], initial_peers=initial_peers)
    if args.addr_file is not None:
        maddrs = [str(m) for m in dht.get_visible_maddrs() if args.host in str(m)]
        args.addr_file.write_text(maddrs[0] + "\n")
    outcomes = AveragingOutcomes()
    status = logging.getLogger("hivemind.optim.optimizer")
    status.setLevel(logging.INFO)  # its status lines, whatever HIVEMIND_LOGLEVEL says
    status.addHandler(outcomes)
    opt = hivemind.Optimizer(
        dht=dht, run_id=f"slow-links-{args.mode}", target_batch_size=target,
        batch_size_per_step=SEQUENCES_PER_STEP,
        optimizer=lambda params: torch.optim.AdamW(params, lr=training.learning_rate,
                                                   betas=(training.adam_beta1, training.adam_beta2)),
        params=groups,
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_factor),
        use_local_updates=False,
        verbose=True,
        **extra,
    )
    log: IO[str] = args.log.open("a", encoding="utf-8")

    def write(**fields: Any) -> None:
        log.write(json.dumps({"t": round(time.time(), 3), **fields}) + "\n")
        log.flush()

    cpu = torch.device("cpu")
    write(ready=True)
    # every peer starts together: a peer training alone first would run ahead and make the
    # others spend the run downloading its state instead of averaging with it
    while args.go_file is not None and not args.go_file.exists() and not STOP.is_set():
        time.sleep(0.1)
    if args.index == 0:
        write(tokens=0, val=validation_loss(model, val_batches, cpu, "fp32"))
    tokens = 0
    started = time.monotonic()
    last_eval = started
    try:
        while time.monotonic() - started < args.seconds and not STOP.is_set():
            loss_sum = 0.0
            for _ in range(accumulation):
                inputs, targets = next(batches)
                loss = lm_loss(model(inputs), targets) / accumulation
                loss.backward()
                loss_sum += loss.item()
            opt.step()
            opt.zero_grad()
            tokens += tokens_per_step
            write(tokens=tokens, loss=round(loss_sum, 4), epoch=opt.local_epoch,
                  together=outcomes.together, alone=outcomes.alone)
            if args.index == 0 and time.monotonic() - last_eval >= args.eval_every:
                last_eval = time.monotonic()
                write(tokens=tokens, val=validation_loss(model, val_batches, cpu, "fp32"))
    except KeyboardInterrupt:
        pass
    finally:
        log.close()
        opt.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
