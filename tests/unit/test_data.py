"""Tokenizers, corpus reading and TokenData batching, on real files in tmp_path."""

from __future__ import annotations

import json
import random
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.data import corpus as corpus_module
from configs.data.corpus import Document, find_files, iter_documents
from configs.data.tokenizer import ByteTokenizer, JsonTokenizer, load_tokenizer
from configs.schema import DataConfig
from worker.data import tokens as data_module
from worker.data.tokens import DataError, TokenData, is_validation_document

# ---- helpers --------------------------------------------------------------------------


def cfg(*paths: Path | str, **kw) -> DataConfig:
    return DataConfig(paths=[str(p) for p in paths], **kw)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n))


def write_docs(folder: Path, count: int, length: int = 300, seed: int = 0) -> list[str]:
    """`count` .txt files of random text, each starting with a unique marker; returns the markers."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    markers = []
    for i in range(count):
        marker = f"<DOC{i:04d}>"
        (folder / f"doc{i:04d}.txt").write_text(marker + random_text(rng, length), encoding="utf-8")
        markers.append(marker)
    return markers


def sequences(batches) -> list[bytes]:
    """Each full sequence (input + last target) of the given batches, as raw token bytes."""
    out = []
    for inputs, targets in batches:
        full = torch.cat([inputs, targets[:, -1:]], dim=1)
        out += [bytes(row.tolist()) for row in full]
    return out


def all_train_sequences(data: TokenData) -> list[bytes]:
    stream, t = data.train_stream, data.seq_len
    return [bytes(stream[i * t : i * t + t + 1].tolist()) for i in range(data.num_train_sequences)]


def decoded(data: TokenData, stream: np.ndarray) -> str:
    return data.tokenizer.decode(stream.tolist())


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    write_docs(tmp_path / "corpus", 60, length=400)
    return tmp_path / "corpus"


# ---- tokenizers -----------------------------------------------------------------------

ROUND_TRIP_TEXTS = [
    "",
    "hello world",
    "héllo wörld — naïve café",
    "日本語のテキスト",
    "snakes 🐍 and rockets 🚀",
    "tabs\tand\nnewlines\r\nand \x00 a nul",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, [ord("x")]]
    assert tok.encode_arrays([text])[0].tolist() == ids


def test_byte_tokenizer_shape() -> None:
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.name) == (256, 0, "bytes")
    with pytest.raises(ValueError, match="256"):
        tok.decode([65, 256])


def train_bpe(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(1)
    texts = ["the quick brown fox jumps over the lazy dog " * 3 + random_text(rng, 200) for _ in range(50)]
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def test_json_tokenizer_from_trained_bpe(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HF

    path = tmp_path / "tok" / "tokenizer.json"
    train_bpe(path)
    tok = load_tokenizer(str(path))
    assert isinstance(tok, JsonTokenizer)
    reference = HF.from_file(str(path))
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert tok.eos_id is not None and tok.eos_id == reference.token_to_id("<|endoftext|>")
    for text in ROUND_TRIP_TEXTS + ["the quick brown fox jumps over the lazy dog"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_batch([text]) == [ids]
    # Learned merges: fewer tokens than bytes on text like the training text.
    text = "the quick brown fox jumps over the lazy dog"
    assert len(tok.encode(text)) < len(text.encode())
    # A directory holding tokenizer.json works too.
    assert load_tokenizer(str(path.parent)).encode(text) == tok.encode(text)


def test_token_data_with_json_tokenizer(tmp_path: Path, corpus_dir: Path) -> None:
    path = tmp_path / "tok" / "tokenizer.json"
    train_bpe(path)
    data = TokenData(cfg(corpus_dir, tokenizer=str(path)), seq_len=16, seed=0)
    eos = data.tokenizer.eos_id
    assert data.train_stream.dtype == np.uint16
    assert int(data.train_stream.max()) < data.tokenizer.vocab_size
    # One end-of-text token after each document.
    separators = int((data.train_stream == eos).sum()) + int((data.validation_stream == eos).sum())
    assert separators == data.num_documents == 60
    assert "<DOC0000>" in decoded(data, data.train_stream) + decoded(data, data.validation_stream)
    inputs, targets = next(data.train_batches(4))
    assert inputs.shape == (4, 16) and inputs.dtype == torch.int64


def test_tokenizer_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError, match="does not exist") as err:
        load_tokenizer(str(missing))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not a tokenizer", encoding="utf-8")
    with pytest.raises(DataError, match="could not be read") as err:
        load_tokenizer(str(bad))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


# ---- reading documents ----------------------------------------------------------------


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("line one\r\nlíne two\n".encode())
    docs = list(iter_documents(cfg(path)))
    assert docs == [Document("notes.txt", "line one\nlíne two\n")]


def test_jsonl_records_are_documents(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    records = [{"body": "first", "id": 1}, None, {"body": "sécond"}, {"body": ""}]
    lines = [json.dumps(r) if r is not None else "" for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = list(iter_documents(cfg(path, jsonl_field="body")))
    # Blank lines and empty texts are skipped; names carry the line number.
    assert docs == [Document("records.jsonl:1", "first"), Document("records.jsonl:3", "sécond")]


def test_directory_is_walked_recursively_and_sorted(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "b" / "deep" / "z.txt").write_text("z", encoding="utf-8")
    (root / "b" / "y.jsonl").write_text(json.dumps({"text": "y"}) + "\n", encoding="utf-8")
    (root / "a" / "x.txt").write_text("x", encoding="utf-8")
    (root / "top.TXT").write_text("top", encoding="utf-8")
    (root / "skip.csv").write_text("not data", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    docs = list(iter_documents(cfg(root)))
    assert [d.name for d in docs] == ["data/a/x.txt", "data/b/deep/z.txt", "data/b/y.jsonl:1", "data/top.TXT"]
    assert [d.text for d in docs] == ["x", "z", "y", "top"]


def test_paths_keep_their_order_and_files_are_read_once(tmp_path: Path) -> None:
    write_docs(tmp_path / "d", 2)
    single = tmp_path / "d" / "doc0001.txt"
    names = [f.name for f in find_files(cfg(single, tmp_path / "d"))]
    assert names == ["doc0001.txt", "d/doc0000.txt"]


def error_message(config: DataConfig) -> str:
    with pytest.raises(DataError) as err:
        list(iter_documents(config))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_error_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "x" / "y"
    message = error_message(cfg(missing))
    assert message.startswith(f"data.paths: {missing} does not exist")
    assert "[] for the embedded corpus" in message


def test_error_directory_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "table.csv").write_text("a,b\n", encoding="utf-8")
    message = error_message(cfg(tmp_path / "d"))
    assert str(tmp_path / "d") in message and "no .txt or .jsonl files" in message


def test_error_file_of_another_kind(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n", encoding="utf-8")
    assert str(path) in error_message(cfg(path))


def test_error_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    message = error_message(cfg(tmp_path / "empty.txt", tmp_path / "blank.jsonl"))
    assert str(tmp_path / "empty.txt") in message and "no text" in message
    with pytest.raises(DataError, match="no text"):
        TokenData(cfg(tmp_path / "empty.txt"), seq_len=8, seed=0)


def test_error_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    message = error_message(cfg(path))
    assert f"{path} line 3" in message and "not valid JSON" in message


def test_error_jsonl_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"content": "a"}\n{"text": "b"}\n', encoding="utf-8")
    message = error_message(cfg(path, jsonl_field="text"))
    assert f"{path} line 1" in message and "'text'" in message and "data.jsonl_field" in message


def test_error_jsonl_field_not_a_string(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": 7}\n', encoding="utf-8")
    assert f"{path} line 2" in error_message(cfg(path))


def test_error_jsonl_line_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('["text"]\n', encoding="utf-8")
    assert f"{path} line 1" in error_message(cfg(path))


def test_max_corpus_bytes_stops_reading(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("é" * 40, encoding="utf-8")  # 80 bytes
    (tmp_path / "b.txt").write_text("b" * 50, encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("not json at all\n", encoding="utf-8")  # beyond the cap
    docs = list(iter_documents(cfg(tmp_path, max_corpus_bytes=101)))
    assert [d.name.rsplit("/", 1)[-1] for d in docs] == ["a.txt", "b.txt"]
    assert docs[1].text == "b" * 21
    # A cap inside a multi-byte character cuts before it.
    docs = list(iter_documents(cfg(tmp_path / "a.txt", max_corpus_bytes=5)))
    assert docs == [Document("a.txt", "éé")]


def test_progress_reports_reach_the_total(corpus_dir: Path) -> None:
    calls: list[tuple[int, int]] = []
    TokenData(cfg(corpus_dir), seq_len=16, seed=0, progress=lambda done, total: calls.append((done, total)))
    total = sum(f.stat().st_size for f in corpus_dir.iterdir())
    assert len(calls) > 1
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (total, total)


# ---- splitting ------------------------------------------------------------------------


def test_validation_never_shares_a_document_with_train(corpus_dir: Path) -> None:
    data = TokenData(cfg(corpus_dir, validation_fraction=0.2), seq_len=16, seed=0)
    assert data.split_method == "hash"
    train_text, val_text = decoded(data, data.train_stream), decoded(data, data.validation_stream)
    in_val = 0
    for i in range(60):
        marker = f"<DOC{i:04d}>"
        assert (marker in train_text) != (marker in val_text)
        expected = is_validation_document(f"corpus/doc{i:04d}.txt", 0.2)
        assert (marker in val_text) == expected
        in_val += expected
    assert 0 < in_val < 60 and data.num_validation_documents == in_val
    assert data.num_validation_sequences > 0


def test_document_side_does_not_depend_on_other_documents(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    write_docs(folder, 40)
    before = TokenData(cfg(folder, validation_fraction=0.3), seq_len=8, seed=0)
    # More documents, sorting before and after the first ones, change the reading order.
    rng = random.Random(11)
    for name in ["a_first", "m_middle", "z_last"] + [f"extra{i}" for i in range(20)]:
        (folder / f"{name}.txt").write_text(f"<NEW {name}>" + random_text(rng, 300), encoding="utf-8")
    after = TokenData(cfg(folder, validation_fraction=0.3), seq_len=8, seed=0)
    assert before.split_method == after.split_method == "hash"
    val_before = decoded(before, before.validation_stream)
    val_after = decoded(after, after.validation_stream)
    sides = [f"<DOC{i:04d}>" in val_before for i in range(40)]
    assert any(sides) and not all(sides)
    assert sides == [f"<DOC{i:04d}>" in val_after for i in range(40)]


def test_fallback_moves_last_documents_when_hash_leaves_validation_empty(tmp_path: Path) -> None:
    names = [f"n{i}" for i in range(200) if not is_validation_document(f"c/n{i}.txt", 0.05)][:6]
    rng = random.Random(3)
    for name in names:
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{name}.txt").write_text(f"<{name}>" + random_text(rng, 500), encoding="utf-8")
    data = TokenData(cfg(tmp_path / "c", validation_fraction=0.05), seq_len=16, seed=0)
    assert data.split_method == "last documents"
    assert data.num_validation_sequences > 0 and data.num_train_sequences > 0
    val_text, train_text = decoded(data, data.validation_stream), decoded(data, data.train_stream)
    last = sorted(names)[-1]
    assert f"<{last}>" in val_text and f"<{last}>" not in train_text
    for name in names:
        assert (f"<{name}>" in val_text) != (f"<{name}>" in train_text)


def test_single_document_is_split_at_the_end_of_its_tokens(tmp_path: Path) -> None:
    text = random_text(random.Random(5), 2000)
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    data = TokenData(cfg(tmp_path / "one.txt", validation_fraction=0.1), seq_len=32, seed=0)
    assert data.split_method == "token stream"
    assert data.num_train_sequences > 0 and data.num_validation_sequences > 0
    joined = np.concatenate([data.train_stream, data.validation_stream])
    assert bytes(joined.tolist()) == text.encode() + b"\x00"
    assert data.validation_tokens == 201  # ceil(0.1 * 2001)


def test_corpus_too_small_for_two_sequences(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("short", encoding="utf-8")
    with pytest.raises(DataError, match="seq_len") as err:
        TokenData(cfg(tmp_path / "tiny.txt"), seq_len=64, seed=0)
    assert str(tmp_path / "tiny.txt") in str(err.value)


# ---- batches --------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_train_split(corpus_dir: Path, num_shards: int) -> None:
    data = TokenData(cfg(corpus_dir), seq_len=16, seed=0)
    everything = all_train_sequences(data)
    assert len(set(everything)) == len(everything)  # random text: each sequence is unique
    seen: list[bytes] = []
    for shard in range(num_shards):
        size = data.num_shard_sequences(shard, num_shards)
        batches = data.train_batches(1, shard, num_shards)
        one_epoch = sequences(next(batches) for _ in range(size))
        assert len(set(one_epoch)) == size  # each sequence of the shard once per epoch
        seen += one_epoch
    assert len(seen) == len(set(seen)) == len(everything)
    assert set(seen) == set(everything)


def test_shard_membership_is_by_index_modulo(corpus_dir: Path) -> None:
    data = TokenData(cfg(corpus_dir), seq_len=16, seed=0)
    everything = all_train_sequences(data)
    shard = sequences(next(data.train_batches(1, 1, 3)) for _ in range(1))
    assert everything.index(shard[0]) % 3 == 1


def test_targets_are_inputs_shifted_by_one(corpus_dir: Path) -> None:
    data = TokenData(cfg(corpus_dir), seq_len=16, seed=0)
    for inputs, targets in [next(data.train_batches(8))] + data.validation_batches(4, 2):
        assert inputs.shape == targets.shape and inputs.shape[1] == 16
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    stream = data.train_stream
    assert set(sequences([next(data.train_batches(8))])) <= set(
        bytes(stream[i * 16 : i * 16 + 17].tolist()) for i in range(data.num_train_sequences)
    )


def test_two_builds_give_identical_batches_and_fingerprint(tmp_path: Path, corpus_dir: Path) -> None:
    # A second "machine": the same files under another absolute path.
    elsewhere = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(corpus_dir, elsewhere)
    a = TokenData(cfg(corpus_dir, validation_fraction=0.2), seq_len=16, seed=7)
    b = TokenData(cfg(elsewhere, validation_fraction=0.2), seq_len=16, seed=7)
    assert a.split_method == "hash"
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    ia, ib = a.train_batches(4, 1, 2), b.train_batches(4, 1, 2)
    for _ in range(20):
        (xa, ya), (xb, yb) = next(ia), next(ib)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(a.validation_batches(4, 3), b.validation_batches(4, 3), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_fingerprint_changes_with_the_data(tmp_path: Path, corpus_dir: Path) -> None:
    a = TokenData(cfg(corpus_dir), seq_len=16, seed=0)
    (corpus_dir / "doc0005.txt").write_text("<DOC0005>changed" + "x" * 300, encoding="utf-8")
    b = TokenData(cfg(corpus_dir), seq_len=16, seed=0)
    assert a.fingerprint != b.fingerprint


def test_different_seeds_give_different_orders(corpus_dir: Path) -> None:
    a = TokenData(cfg(corpus_dir), seq_len=16, seed=0)
    b = TokenData(cfg(corpus_dir), seq_len=16, seed=1)
    assert a.fingerprint == b.fingerprint  # same data, only the order differs
    first_a = sequences([next(a.train_batches(16))])
    first_b = sequences([next(b.train_batches(16))])
    assert first_a != first_b


def test_each_epoch_has_a_new_order(corpus_dir: Path) -> None:
    data = TokenData(cfg(corpus_dir), seq_len=16, seed=0)
    size = data.num_shard_sequences(0, 2)
    batches = data.train_batches(1, 0, 2)
    epoch0 = sequences(next(batches) for _ in range(size))
    epoch1 = sequences(next(batches) for _ in range(size))
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)


@pytest.mark.parametrize("start_step", [0, 1, 7, 11, 12, 13, 30])
def test_start_step_equals_iterating(corpus_dir: Path, start_step: int) -> None:
    data = TokenData(cfg(corpus_dir), seq_len=16, seed=3)
    batch_size, shard, shards = 40, 2, 3
    steps_per_epoch = data.num_shard_sequences(shard, shards) // batch_size
    assert 0 < steps_per_epoch < 30  # the cases cross epoch boundaries
    walked = data.train_batches(batch_size, shard, shards)
    for _ in range(start_step):
        next(walked)
    jumped = data.train_batches(batch_size, shard, shards, start_step=start_step)
    for _ in range(steps_per_epoch + 2):
        (xw, yw), (xj, yj) = next(walked), next(jumped)
        assert torch.equal(xw, xj) and torch.equal(yw, yj)


def test_bad_shard_arguments(corpus_dir: Path) -> None:
    data = TokenData(cfg(corpus_dir), seq_len=16, seed=0)
    with pytest.raises(ValueError, match="shard_index"):
        data.train_batches(4, shard_index=3, num_shards=3)
    with pytest.raises(ValueError, match="shard_index"):
        data.train_batches(4, shard_index=-1, num_shards=3)
    with pytest.raises(ValueError, match="num_shards"):
        data.train_batches(4, shard_index=0, num_shards=0)
    with pytest.raises(ValueError, match="start_step"):
        data.train_batches(4, start_step=-1)
    with pytest.raises(ValueError, match="batch_size"):
        data.train_batches(0)


def test_shard_smaller_than_a_batch_says_how_many_sequences(corpus_dir: Path) -> None:
    data = TokenData(cfg(corpus_dir), seq_len=16, seed=0)
    size = data.num_shard_sequences(1, 4)
    with pytest.raises(DataError, match=f"shard 1 of 4 has {size:,} sequences") as err:
        data.train_batches(size + 1, 1, 4)  # raised at the call, not at the first batch
    assert f"batch_size={size + 1}" in str(err.value)


def test_validation_batches(corpus_dir: Path) -> None:
    data = TokenData(cfg(corpus_dir, validation_fraction=0.2), seq_len=16, seed=0)
    n = data.num_validation_sequences
    assert n >= 8
    batches = data.validation_batches(4, 2)
    assert [x.shape for x, _ in batches] == [(4, 16), (4, 16)]
    # Spread over the whole split, not just its first sequences.
    val_sequences = sequences(batches)
    stream = data.validation_stream
    positions = [
        next(i for i in range(n) if bytes(stream[i * 16 : i * 16 + 17].tolist()) == s) for s in val_sequences
    ]
    assert positions == sorted(positions) and positions[-1] >= n // 2
    # Never more than the split holds; one short batch when it holds fewer than a batch.
    assert sum(len(x) for x, _ in data.validation_batches(4, 10_000)) == n // 4 * 4
    (short, _), = data.validation_batches(n + 5, 3)
    assert len(short) == n


# ---- the embedded corpus --------------------------------------------------------------


def test_embedded_stdlib_corpus() -> None:
    config = DataConfig(max_corpus_bytes=2_000_000)
    docs = list(iter_documents(config))
    names = [d.name for d in docs]
    assert len(docs) > 10 and names == sorted(names)
    assert all(name.endswith(".py") and "site-packages" not in name for name in names)
    assert sum(len(d.text.encode()) for d in docs) <= 2_000_000
    data = TokenData(config, seq_len=128, seed=0)
    assert data.num_documents == len(docs)
    assert data.num_train_sequences > 1000 and data.num_validation_sequences > 0
    assert data.train_stream.dtype == np.uint16
    assert "stdlib" in data.describe() and data.fingerprint[:8] in data.describe()
    x, y = next(data.train_batches(8))
    assert x.shape == (8, 128)


def test_modules_export_data_error() -> None:
    import configs.data.tokenizer as tokenizer_module

    assert corpus_module.DataError is data_module.DataError is tokenizer_module.DataError
    assert issubclass(DataError, ValueError)
