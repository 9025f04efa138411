"""Prepared token shards: `coordinator data prepare` (streaming, resuming, refusing) and the
workers' memory-mapped reading, on real files in tmp_path."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from configs.data.errors import DataError
from configs.data.permutation import SeededPermutation
from configs.data.shards import MANIFEST, read_manifest
from configs.schema import DataConfig
from coordinator.data.prepare import STATE, PrepareProgress, prepare
from worker.data.prepared import PreparedData
from worker.data.tokens import TokenData

ROOT = Path(__file__).resolve().parents[2]
SEQ = 16


def corpus(folder: Path, count: int = 120, seed: int = 0) -> list[dict]:
    """A JSONL corpus of `count` records, written plain, gzip'd and zstd'd (`folder/KIND/corpus`)."""
    rng = random.Random(seed)
    records = [{"text": f"<{i}>" + "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(rng.randrange(20, 400)))}
               for i in range(count)]
    folder.mkdir(parents=True, exist_ok=True)
    raw = "".join(json.dumps(r) + "\n" for r in records).encode()
    # the same directory name under each: document names (which the split hashes) are alike
    for kind, suffix, pack in (("plain", "", bytes), ("gz", ".gz", gzip.compress),
                               ("zst", ".zst", zstandard.ZstdCompressor().compress)):
        (folder / kind / "corpus").mkdir(parents=True)
        (folder / kind / "corpus" / f"c.jsonl{suffix}").write_bytes(pack(raw))
    return records


def data_config(path: Path, **kw) -> DataConfig:
    return DataConfig(paths=[str(path)], validation_fraction=0.2, **kw)


def shard_tokens(directory: Path, split: str) -> np.ndarray:
    manifest = read_manifest(directory)
    parts = [np.fromfile(directory / s.name, dtype="<u2") for s in manifest.shards(split)]
    return np.concatenate(parts) if parts else np.empty(0, np.uint16)


# ---- the permutation ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32))
def test_a_seeded_permutation_is_a_bijection_of_0_to_n(n: int, seed: int) -> None:
    order = SeededPermutation(n, (seed, 1))(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))


def test_a_seeded_permutation_depends_on_its_seed_only_and_answers_any_positions() -> None:
    n = 100_003
    first, again, other = SeededPermutation(n, (1, 0)), SeededPermutation(n, (1, 0)), SeededPermutation(n, (1, 1))
    whole = first(np.arange(n))
    assert np.array_equal(whole, again(np.arange(n)))
    assert (whole != other(np.arange(n))).mean() > 0.99
    picks = np.array([n - 1, 0, 5, 77_777])
    assert np.array_equal(first(picks), whole[picks])
    assert abs(np.corrcoef(np.arange(n), whole)[0, 1]) < 0.02  # shuffled, not shifted
    with pytest.raises(IndexError):
        first(np.array([n]))


# ---- prepare ----------------------------------------------------------------------------


def test_prepared_shards_hold_what_a_worker_tokenizing_the_corpus_itself_holds(tmp_path: Path) -> None:
    corpus(tmp_path / "src")
    manifest = prepare(data_config(tmp_path / "src" / "plain" / "corpus"), tmp_path / "out", shard_tokens=1000)
    own = TokenData(data_config(tmp_path / "src" / "plain" / "corpus"), SEQ, 0)
    assert own.split_method == "hash"  # both split by the document hash: the streams must agree
    assert np.array_equal(shard_tokens(tmp_path / "out", "train"), own.train_stream)
    assert np.array_equal(shard_tokens(tmp_path / "out", "validation"), own.validation_stream)
    assert [s.tokens for s in manifest.train[:-1]] == [1000] * (len(manifest.train) - 1) and len(manifest.train) > 3
    for split in ("train", "validation"):
        for shard in manifest.shards(split):
            data = (tmp_path / "out" / shard.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard.sha256
            starts = np.fromfile(tmp_path / "out" / shard.docs_name, dtype="<u8")
            assert len(starts) == shard.documents
            tokens = np.frombuffer(data, dtype="<u2")
            assert all(chr(tokens[s]) == "<" for s in starts)  # each boundary is a document's first token
    assert sum(s.documents for s in manifest.train + manifest.validation) == manifest.documents == 120
    assert not (tmp_path / "out" / STATE).exists() and not list((tmp_path / "out").glob("*.partial"))


def test_gzip_and_zstd_sources_prepare_to_the_same_tokens(tmp_path: Path) -> None:
    corpus(tmp_path / "src")
    prints = {kind: prepare(data_config(tmp_path / "src" / kind / "corpus"), tmp_path / kind, shard_tokens=4096).fingerprint
              for kind in ("plain", "gz", "zst")}
    assert len(set(prints.values())) == 1, prints


def test_an_interrupted_prepare_resumes_to_the_same_shards_without_redoing_finished_ones(tmp_path: Path) -> None:
    corpus(tmp_path / "src", count=400)
    config = data_config(tmp_path / "src" / "plain" / "corpus")
    clean = prepare(config, tmp_path / "clean", shard_tokens=2000)

    calls = []

    def stop_after_two(progress: PrepareProgress) -> None:
        calls.append(progress)
        if len(calls) == 2:
            raise KeyboardInterrupt

    import coordinator.data.prepare as module

    small_chunks = module._CHUNK_DOCS
    module._CHUNK_DOCS = 40  # several chunks, so the stop comes mid-corpus
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare(config, tmp_path / "out", shard_tokens=2000, progress=stop_after_two)
        state = json.loads((tmp_path / "out" / STATE).read_text())
        finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("train-*.tokens")}
        assert state["documents"] > 0 and finished
        # bytes written after the last saved state (a kill mid-chunk) are cut back, not kept
        partial = next((tmp_path / "out").glob("train-*.tokens.partial"))
        with partial.open("ab") as handle:
            handle.write(b"\xff" * 998)
        resumed = []
        manifest = prepare(config, tmp_path / "out", shard_tokens=2000, progress=resumed.append)
    finally:
        module._CHUNK_DOCS = small_chunks
    assert manifest.fingerprint == clean.fingerprint
    assert resumed and resumed[-1].skipped == state["documents"]
    assert all((tmp_path / "out" / name).stat().st_mtime_ns == at for name, at in finished.items())
    assert not (tmp_path / "out" / STATE).exists()


def test_prepare_refuses_a_directory_it_would_mix_with_other_data(tmp_path: Path) -> None:
    corpus(tmp_path / "src")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no prepare to resume"):
        prepare(data_config(tmp_path / "src" / "plain" / "corpus"), tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    # an interrupted prepare of other settings is neither resumed nor overwritten
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / STATE).write_text(json.dumps({"settings": {"shard_tokens": 1}, "documents": 3}))
    with pytest.raises(DataError, match="other inputs or settings"):
        prepare(data_config(tmp_path / "src" / "plain" / "corpus"), tmp_path / "half")


def test_a_corpus_whose_validation_split_is_empty_is_named(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("a single document " * 50)
    with pytest.raises(DataError, match="validation split of .* is empty"):
        prepare(DataConfig(paths=[str(tmp_path / "one.txt")], validation_fraction=0.01), tmp_path / "out")


# ---- reading ----------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path: Path) -> DataConfig:
    corpus(tmp_path / "src", count=300)
    config = data_config(tmp_path / "src" / "plain" / "corpus")
    prepare(config, tmp_path / "prepared", shard_tokens=3000)
    return config.model_copy(update={"prepared": str(tmp_path / "prepared")})


def rows(batches) -> list[bytes]:
    return [bytes(torch.cat([i, t[:, -1:]], 1)[r].tolist()) for i, t in batches for r in range(len(i))]


def test_replica_shards_are_disjoint_and_cover_every_sequence_each_epoch(prepared: DataConfig) -> None:
    data = PreparedData(prepared, SEQ, seed=3)
    stream = shard_tokens(Path(prepared.prepared), "train")
    manifest = read_manifest(prepared.prepared)
    # every sequence lies inside one shard: from the shard's concatenated tokens, shard by shard
    expected, offset = [], 0
    for shard in manifest.train:
        for j in range((shard.tokens - 1) // SEQ):
            expected.append(bytes(stream[offset + j * SEQ : offset + j * SEQ + SEQ + 1].tolist()))
        offset += shard.tokens
    assert data.num_train_sequences == len(expected)
    seen = []
    for shard in range(3):
        steps = data.num_shard_sequences(shard, 3)  # batch size 1: a whole epoch, nothing dropped
        it = data.train_batches(1, shard, 3)
        seen += rows(next(it) for _ in range(steps))
    assert sorted(seen) == sorted(expected)


def test_a_later_start_step_is_the_same_batches_and_epochs_reshuffle(prepared: DataConfig) -> None:
    data = PreparedData(prepared, SEQ, seed=0)
    per_epoch = data.num_shard_sequences(1, 2) // 4
    it = data.train_batches(4, 1, 2)
    first = [next(it) for _ in range(per_epoch + 3)]
    later = data.train_batches(4, 1, 2, start_step=per_epoch - 2)
    assert rows(first[per_epoch - 2 :]) == rows(next(later) for _ in range(5))
    assert rows(first[:3]) != rows(first[per_epoch : per_epoch + 3])
    inputs, targets = first[0]
    assert inputs.dtype == torch.int64 and inputs.shape == (4, SEQ)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_validation_batches_are_the_same_on_every_machine(prepared: DataConfig) -> None:
    a = PreparedData(prepared, SEQ, seed=0).validation_batches(4, 3)
    b = PreparedData(prepared, SEQ, seed=9).validation_batches(4, 3)
    assert len(a) == 3 and rows(a) == rows(b)


def test_reading_names_what_is_wrong_with_prepared_data(prepared: DataConfig, tmp_path: Path) -> None:
    directory = Path(prepared.prepared)
    with pytest.raises(DataError, match="prepared with the bytes tokenizer, not data.tokenizer"):
        tokenizer = tmp_path / "tokenizer.json"
        tokenizer.write_text(json.dumps(_word_level_tokenizer()))
        PreparedData(prepared.model_copy(update={"tokenizer": str(tokenizer)}), SEQ, 0)
    shard = directory / read_manifest(directory).train[1].name
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"holds 5,998 bytes, not the manifest's 6,000: copy it again"):
        PreparedData(prepared, SEQ, 0)
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        PreparedData(prepared, SEQ, 0)
    (directory / MANIFEST).unlink()
    with pytest.raises(DataError, match="holds no manifest.json: prepare data into it"):
        PreparedData(prepared, SEQ, 0)


def _word_level_tokenizer() -> dict:
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "a": 2}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}


# ---- the command ------------------------------------------------------------------------


def test_the_prepare_and_verify_commands_report_in_one_line_each(tmp_path: Path) -> None:
    corpus(tmp_path / "src")
    config = tmp_path / "run.yaml"
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    command = [sys.executable, "-m", "coordinator.app.cli", "data"]
    done = subprocess.run([*command, "prepare", "--config", str(config), "--set",
                           f"data.paths=[{tmp_path / 'src' / 'zst' / 'corpus'}]", "--out", str(tmp_path / "out"),
                           "--shard-size", "1"], capture_output=True, check=False, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"prepared: {tmp_path / 'out'} · 120 documents"), done.stdout
    assert f"--set data.prepared={tmp_path / 'out'}" in done.stdout
    ok = subprocess.run([*command, "verify", str(tmp_path / "out")], capture_output=True, check=False, text=True, timeout=60, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.startswith("verified:"), ok.stderr
    shard = tmp_path / "out" / read_manifest(tmp_path / "out").train[0].name
    damaged = bytearray(shard.read_bytes())
    damaged[7] ^= 1
    shard.write_bytes(bytes(damaged))
    bad = subprocess.run([*command, "verify", str(tmp_path / "out")], capture_output=True, check=False, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[0] == f"data error: {shard.name}: sha256 differs from the manifest", bad.stderr
    refused = subprocess.run([*command, "prepare", "--config", str(config), "--out", str(tmp_path / "src")],
                             capture_output=True, check=False, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "not empty and holds no prepare to resume" in refused.stderr
    missing = subprocess.run([sys.executable, "-m", "coordinator.app.cli", "--config", str(config), "--set",
                              f"data.prepared={tmp_path / 'nowhere'}", "--check"], capture_output=True, check=False,
                             text=True, timeout=120, cwd=ROOT)
    assert missing.returncode == 2 and missing.stderr.startswith("config error: data.prepared: "), missing.stderr
    assert "is not a directory; prepare data into it with coordinator data prepare" in missing.stderr


def test_a_writer_resumed_between_recording_a_full_shard_and_renaming_it_finishes_the_rename(tmp_path: Path) -> None:
    from configs.data.shards import ShardWriter, token_dtype

    dtype = token_dtype(256)
    writer = ShardWriter(tmp_path, "train", dtype, 10)
    writer.add_document(np.arange(14))  # one full shard of 10, 4 tokens in the next
    state = writer.state()  # recorded; the stop comes before commit()
    assert (tmp_path / "train-00000.tokens.partial").exists() and not (tmp_path / "train-00000.tokens").exists()
    resumed = ShardWriter(tmp_path, "train", dtype, 10, resume=state)
    assert (tmp_path / "train-00000.tokens").exists() and resumed.tokens == 14
    # a stop after finish() renamed the last shard but before the manifest: back to the state
    older = resumed.state()
    resumed.finish()
    again = ShardWriter(tmp_path, "train", dtype, 10, resume=older)
    again.add_document(np.arange(3))
    shards = again.finish()
    assert [s.tokens for s in shards] == [10, 7]
    assert np.fromfile(tmp_path / "train-00001.tokens", dtype=dtype).tolist() == [10, 11, 12, 13, 0, 1, 2]


def test_a_finished_prepare_is_returned_again_only_for_the_same_inputs(tmp_path: Path) -> None:
    corpus(tmp_path / "src")
    first = prepare(data_config(tmp_path / "src" / "plain" / "corpus"), tmp_path / "out", shard_tokens=4096)
    assert prepare(data_config(tmp_path / "src" / "plain" / "corpus"), tmp_path / "out", shard_tokens=4096) == first
    with pytest.raises(DataError, match="prepared from other inputs or settings"):
        prepare(data_config(tmp_path / "src" / "plain" / "corpus", jsonl_field="body"), tmp_path / "out",
                shard_tokens=4096)
