"""The memory model (configs/memory.py) against real training steps of full-width GPT-J 6B stages.

    python tests/benchmarks/bench_memory.py [--seq 128 512 2048] [--layers 1 2] [--json FILE]

Each case runs in a fresh process, so that its peak RSS is its own: a stage of GPT-J 6B's width
(d_model 4096, ff 16384, 16 heads, rotary 64, vocab 50400) of one or two blocks, as a middle stage
(hidden states in and out) or with the embedding and the head (token ids in, loss out); the
worker's own modules (GPTJSpan, build_optimizer's AdamW, ReplicaSync's anchor), fp32 on the CPU,
micro-batch 1, two optimizer steps (AdamW's moments exist from the first) and, where it fits in
this machine's RAM, a round's pseudo-gradient with the `none` codec. Its peak RSS is printed
beside the model's prediction for the same terms (one micro-batch in flight; a follower: no
broadcast residual, no momentum) plus the framework's fixed share, and the ratio. A GPU, where
one is at hand (`--device cuda`), reports torch.cuda.max_memory_allocated against the device
part of the prediction. Results go to tests/benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
ROUND_RAM_SHARE = 0.7  # run a round's pseudo-gradient only where the prediction fits in this much RAM


def case_model(layers: int, ends: bool):  # -> ModelConfig
    """GPT-J 6B's width with `layers` blocks; a middle stage is the span [1, layers + 1) of a model
    two blocks longer, so that it holds neither the embedding nor the head."""
    from configs.loader import load_config

    model = load_config("gptj-6b").model
    return model.model_copy(update={"n_layer": layers if ends else layers + 2})


def predict(layers: int, ends: bool, seq: int, device: str, round_: bool) -> dict[str, int]:
    from configs.memory import FRAMEWORK_BYTES, TrainingShape, span_memory

    model = case_model(layers, ends)
    start, end = (0, layers) if ends else (1, layers + 1)
    shape = TrainingShape(precision="fp32", seq_len=seq, micro_batch=1, device=device, in_flight=1, leads=False)
    memory = span_memory(model, start, end, shape)
    params = memory.weights // 4
    diloco = memory.diloco if round_ else 4 * params  # without a round: the anchor alone
    device_part = memory.device - (memory.diloco if device == "cpu" else 0)
    total = device_part + (diloco if device == "cpu" else 0) + FRAMEWORK_BYTES[device]
    return {"params": params, "predicted_bytes": total, "device_part": device_part, "diloco": diloco,
            "activations": memory.activations, "optimizer_step": memory.optimizer_step}


def run_case(layers: int, ends: bool, seq: int, device_name: str, round_: bool) -> dict:
    """In this process: build the stage, train two steps (and take a pseudo-gradient), measure."""
    import torch

    from configs.loader import load_config
    from worker.model.gptj import GPTJSpan, lm_loss
    from worker.replicas.diloco import OuterSettings, ReplicaSync
    from worker.runtime.standalone import build_optimizer

    torch.manual_seed(0)
    device = torch.device(device_name)
    model = case_model(layers, ends)
    start, end = (0, layers) if ends else (1, layers + 1)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    module = GPTJSpan(model, start, end).to(device)
    optimizer = build_optimizer(module, load_config("gptj-6b").training)
    sync = ReplicaSync(list(module.parameters()), OuterSettings())
    step_s = []
    for _ in range(2):
        began = time.perf_counter()
        if ends:
            tokens = torch.randint(0, model.vocab_size, (1, seq), device=device)
            lm_loss(module(tokens), torch.roll(tokens, -1, 1)).backward()
        else:
            hidden = torch.randn(1, seq, model.d_model, device=device, requires_grad=True)
            out = module(hidden)
            out.backward(torch.randn_like(out))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - began)
    if round_:
        with torch.no_grad():
            sync.pseudo_gradient(list(module.parameters()))
    result = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "baseline_rss_bytes": baseline, "step_s": step_s}
    if device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--one", nargs=4, metavar=("LAYERS", "ENDS", "SEQ", "ROUND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        layers, ends, seq, round_ = (int(v) for v in args.one)
        print(json.dumps(run_case(layers, bool(ends), seq, args.device, bool(round_))))
        return 0

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    print(f"{'stage':<26}{'seq':>6}{'round':>7}{'predicted GiB':>15}{'measured GiB':>14}{'ratio':>8}{'step s':>8}")
    for layers in args.layers:
        for ends in (False, True):
            for seq in args.seq:
                full = predict(layers, ends, seq, args.device, True)
                round_ = args.device == "cuda" or full["predicted_bytes"] < ROUND_RAM_SHARE * ram
                predicted = predict(layers, ends, seq, args.device, round_)
                child = subprocess.run(
                    [sys.executable, __file__, "--device", args.device, "--one", str(layers), str(int(ends)),
                     str(seq), str(int(round_))], capture_output=True, text=True, check=False)
                if child.returncode != 0:
                    print(child.stderr[-2000:], file=sys.stderr)
                    return 1
                measured = json.loads(child.stdout.splitlines()[-1])
                peak = measured.get("cuda_max_allocated_bytes", measured["peak_rss_bytes"])
                want = predicted["device_part"] if args.device == "cuda" else predicted["predicted_bytes"]
                name = f"{layers} block(s){' + embed + head' if ends else ''}"
                row = {"layers": layers, "embedding_and_head": ends, "seq_len": seq, "round": round_,
                       **predicted, **measured, "ratio": peak / want}
                rows.append(row)
                print(f"{name:<26}{seq:>6}{'yes' if round_ else 'no':>7}{want / GIB:>15.2f}{peak / GIB:>14.2f}"
                      f"{peak / want:>8.3f}{statistics.median(measured['step_s']):>8.1f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"measured / predicted: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}"
          f" over {len(rows)} shapes ({args.device}); within ±15%: {all(0.85 <= r <= 1.15 for r in ratios)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps({"device": args.device, "ram_bytes": ram, "rows": rows}, indent=1))
    tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
