"""Data at GPT-JT scale: how fast `coordinator data prepare` turns text into token shards, and
whether a worker's start-up grows with the corpus.

    python tests/benchmarks/bench_data.py [--text-mb 100] [--big-tokens 1e9] [--repeats 5]

1. Prepare throughput. A generated JSONL corpus of `--text-mb` MB (this Python's standard
   library source, one record per file, repeated under new names) is prepared twice: with the
   byte tokenizer and with a byte-level BPE of GPT-J's vocabulary size (50,400) trained here on
   a few MB of it (GPT-J's own tokenizer.json cannot be downloaded; BPE encoding speed hardly
   depends on which merges it holds). Reported: MB of text per second of wall time and per
   CPU-second (the prepare's process CPU time, all threads: "per core"), next to the ceiling,
   the same tokenizer's `encode_batch_fast` on the same texts already in memory.
2. Start-up. Prepared directories of 10M and `--big-tokens` tokens (uint16 ids in 1M-token
   documents, written with the shard writer, not tokenized: only their size matters here).
   A fresh Python process per repeat, alternating sizes, runs what a first-stage worker does:
   import the data stack, open `data.prepared`, take the first batch of a handed-out range
   (`PreparedData.batches_at`: epoch 0's order, positions 0-7). Reported: seconds from
   process start to first batch, the data part alone (open + first batch) and the process's RSS
   then. The issue's bar: the big corpus within 10% of the small one on both. The bed is
   checked first: the small corpus's repeats of the data part must agree within 20%
   (interquartile range over the median), or no ratio is reported.

Medians of `--repeats`. Results go to tests/benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configs.data.corpus import stdlib_root
from configs.data.shards import MANIFEST, Manifest, ShardWriter, write_json_atomic
from configs.data.tokenizer import load_tokenizer
from configs.schema import DataConfig
from coordinator.data.prepare import prepare

RESULTS = ROOT / "tests" / "benchmarks" / "results" / "data.json"
GPTJ_VOCAB = 50_400
SHARD_TOKENS = 64 << 20
SPREAD_LIMIT = 0.2  # the small corpus's repeats (interquartile range / median) must agree this well

# what a first-stage worker does before its first step; prints seconds since process start and RSS
FIRST_BATCH = """
import json, os, sys, time
started = float(sys.argv[2])
from configs.schema import DataConfig
from worker.data.prepared import PreparedData
t0 = time.time()
data = PreparedData(DataConfig(prepared=sys.argv[1]), seq_len=2048, seed=0)
inputs, _ = data.batches_at(0, 0, 8, 8)[0]  # a handed-out range's first microbatch, as in a swarm
t1 = time.time()
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
print(json.dumps({"to_first_batch_s": t1 - started, "data_s": t1 - t0, "rss_bytes": rss,
                  "sequences": data.num_train_sequences}))
"""


def generate_corpus(path: Path, megabytes: float) -> int:
    """JSONL of stdlib source files, repeated under new names until `megabytes`; returns its bytes."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib_root().rglob("*.py"))[:3000]]
    target, written, copy = int(megabytes * 1e6), 0, 0
    with path.open("w", encoding="utf-8") as out:
        while written < target:
            for i, text in enumerate(texts):
                line = json.dumps({"id": f"{copy}-{i}", "text": text}) + "\n"
                out.write(line)
                written += len(line.encode())
                if written >= target:
                    break
            copy += 1
    return written


def train_bpe(corpus: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sample = []
    with corpus.open(encoding="utf-8") as lines:
        for line in lines:
            sample.append(json.loads(line)["text"])
            if sum(map(len, sample)) > 8e6:
                break
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=GPTJ_VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sample, trainer)
    tokenizer.save(str(out))
    return out


def measure_prepare(corpus: Path, text_bytes: int, tokenizer: str, label: str, out: Path) -> dict:
    config = DataConfig(paths=[str(corpus)], tokenizer=tokenizer, validation_fraction=0.01)
    wall, cpu = time.perf_counter(), time.process_time()
    manifest = prepare(config, out, shard_tokens=SHARD_TOKENS)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    encoder = load_tokenizer(tokenizer)
    ceiling_wall, ceiling_cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(texts), 4096):
        encoder.encode_arrays(texts[start : start + 4096])
    ceiling_wall, ceiling_cpu = time.perf_counter() - ceiling_wall, time.process_time() - ceiling_cpu
    mb = text_bytes / 1e6
    return {"tokenizer": label, "text_mb": round(mb, 1),
            "tokens": manifest.tokens("train") + manifest.tokens("validation"),
            "mb_per_s": mb / wall, "mb_per_cpu_s": mb / cpu, "cores_used": cpu / wall,
            "encode_ceiling_mb_per_s": mb / ceiling_wall, "encode_ceiling_mb_per_cpu_s": mb / ceiling_cpu}


def synthetic_prepared(directory: Path, tokens: int) -> None:
    """`tokens` random GPT-J-vocabulary ids as prepared data (99% train), written shard by shard."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    dtype = np.dtype("<u2")
    shards = {}
    for split, count in (("train", tokens - tokens // 100), ("validation", tokens // 100)):
        writer = ShardWriter(directory, split, dtype, SHARD_TOKENS)
        left = count
        while left:
            size = min(left, 1 << 20)
            writer.add_document(rng.integers(0, GPTJ_VOCAB, size, dtype=np.uint16))
            left -= size
        shards[split] = writer.finish()
    manifest = Manifest(tokenizer="bytes", tokenizer_fingerprint="bytes", vocab_size=GPTJ_VOCAB, eos_id=0,
                        dtype="uint16", shard_tokens=SHARD_TOKENS, validation_fraction=0.01,
                        source="generated", text_bytes=0, documents=0, **shards)
    write_json_atomic(directory / MANIFEST, manifest.to_json())


def first_batch(directory: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", FIRST_BATCH, str(directory), repr(time.time())],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-mb", type=float, default=100)
    parser.add_argument("--big-tokens", type=float, default=1e9)
    parser.add_argument("--small-tokens", type=float, default=1e7)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    results: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp_path = Path(tmp)
        corpus = tmp_path / "corpus.jsonl"
        text_bytes = generate_corpus(corpus, args.text_mb)
        bpe = train_bpe(corpus, tmp_path / "tokenizer.json")
        results["prepare"] = [measure_prepare(corpus, text_bytes, spec, label, tmp_path / f"prepared-{i}")
                              for i, (spec, label) in enumerate((("bytes", "bytes"), (str(bpe), "BPE 50,400")))]
        for row in results["prepare"]:
            print(f"prepare, {row['tokenizer']}: {row['mb_per_s']:.1f} MB/s of text "
                  f"({row['mb_per_cpu_s']:.1f} MB per CPU-second, {row['cores_used']:.2f} cores) · encode alone "
                  f"{row['encode_ceiling_mb_per_s']:.1f} MB/s ({row['encode_ceiling_mb_per_cpu_s']:.1f} per CPU-s) · "
                  f"{row['text_mb']} MB → {row['tokens']:,} tokens", flush=True)
        for tokenizer_dir in tmp_path.glob("prepared-*"):
            for shard in tokenizer_dir.iterdir():
                shard.unlink()
        sizes = {"small": int(args.small_tokens), "big": int(args.big_tokens)}
        for name, tokens in sizes.items():
            started = time.perf_counter()
            synthetic_prepared(tmp_path / name, tokens)
            print(f"generated {name}: {tokens:,} tokens in {time.perf_counter() - started:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in sizes}
        for name in sizes:  # a first run of each warms the page cache for the interpreter and torch
            first_batch(tmp_path / name)
        for _ in range(args.repeats):
            for name in sizes:
                runs[name].append(first_batch(tmp_path / name))
    startup = {}
    for name, rows in runs.items():
        startup[name] = {key: statistics.median(r[key] for r in rows) for key in ("to_first_batch_s", "data_s", "rss_bytes")}
        startup[name]["tokens"], startup[name]["runs"] = sizes[name], rows
        print(f"start-up, {sizes[name]:,} tokens: {startup[name]['to_first_batch_s']:.2f} s to first batch "
              f"(data {startup[name]['data_s'] * 1e3:.0f} ms), RSS {startup[name]['rss_bytes'] / 2**20:.0f} MiB")
    results["startup"] = startup
    # the bed: the data part's repeats (the whole process's are mostly importing torch, and a
    # shared machine's slow starts come in bursts); one slow repeat moves no quartile
    small = [r["data_s"] for r in runs["small"]]
    quartiles = statistics.quantiles(small, n=4)
    spread = (quartiles[2] - quartiles[0]) / statistics.median(small)
    results["bed"] = {"small_repeat_spread": spread, "limit": SPREAD_LIMIT, "ok": spread <= SPREAD_LIMIT}
    if spread > SPREAD_LIMIT:
        print(f"bed: the small corpus's repeats spread {spread:.0%} (> {SPREAD_LIMIT:.0%}): too noisy, no ratio")
    else:
        ratios = {key: startup["big"][key] / startup["small"][key] for key in ("to_first_batch_s", "data_s", "rss_bytes")}
        results["ratios"] = ratios
        verdict = "PASS" if max(ratios.values()) <= 1.10 else "FAIL"
        print(f"big / small: time to first batch ×{ratios['to_first_batch_s']:.3f} (data part "
              f"×{ratios['data_s']:.3f}), RSS ×{ratios['rss_bytes']:.3f} (bar ≤ ×1.10): {verdict} "
              f"(bed: the data part's repeats spread {spread:.0%})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"saved {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
