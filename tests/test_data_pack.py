"""Packing text into MDS samples, and the atomic write."""

import gzip
import json
import os
import tempfile

import numpy as np
import pytest

from kiln.data.pack import (META_FILE, TMP_MARK, is_complete_dataset, iter_documents, pack_text_to_mds,
                            read_meta, write_samples_to_mds)
from kiln.data.tokenizer import bundled_tokenizer_path, load_tokenizer
from kiln.errors import KilnDataError

DOCS = [
    "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.",
    "Blessed are the meek: for they shall inherit the earth.",
    "Jesus wept.\nThen said the Jews, Behold how he loved him!\nAnd some of them said, Could not this man?",
]


def read_samples(path: str) -> list[np.ndarray]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=path, batch_size=1, shuffle=False)
    return [ds[i]["tokens"] for i in range(ds.num_samples)]


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))  # streaming's file locks live there
    os.makedirs(tmp_path / "t")


@pytest.fixture
def corpus(tmp_path):
    # One plain and one gzip file; documents are blank-line separated (runs of blank lines too).
    a = tmp_path / "a.txt"
    a.write_text(DOCS[0] + "\n\n\n" + DOCS[1] + "\n", encoding="utf-8")
    b = tmp_path / "b.txt.gz"
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.write("\n" + DOCS[2] + "\n")
    return [str(a), str(b)]


def test_iter_documents(corpus):
    assert list(iter_documents(corpus)) == DOCS


@pytest.mark.parametrize("seq_len", [8, 16])
def test_pack_samples(corpus, tmp_path, seq_len):
    tok = load_tokenizer(bundled_tokenizer_path())
    stream = [t for d in DOCS for t in (*tok.encode(d), tok.eos_id)]
    out = str(tmp_path / "ds")
    stats = pack_text_to_mds(corpus, bundled_tokenizer_path(), seq_len, out)

    assert (stats.documents, stats.tokens) == (3, len(stream))
    assert stats.samples == (len(stream) - 1) // seq_len
    assert stats.samples * seq_len + 1 + stats.dropped_tokens == stats.tokens  # conserved

    samples = read_samples(out)
    assert len(samples) == stats.samples
    assert all(s.shape == (seq_len + 1,) and s.dtype == np.uint16 for s in samples)
    for prev, nxt in zip(samples, samples[1:]):
        assert prev[-1] == nxt[0]  # consecutive samples overlap by one token
    rebuilt = list(samples[0]) + [t for s in samples[1:] for t in s[1:]]
    assert rebuilt == stream[: len(rebuilt)]
    assert rebuilt.count(tok.eos_id) >= 2  # documents are EOS-separated

    meta = read_meta(out)
    assert meta["seq_len"] == seq_len and meta["vocab_size"] == 4096 and meta["eos_id"] == tok.eos_id
    assert meta["tokens"] == stats.tokens and meta["documents"] == 3 and meta["samples"] == stats.samples
    with open(os.path.join(out, "index.json")) as f:
        shard = json.load(f)["shards"][0]
    assert shard["compression"] == "zstd" and shard["column_encodings"] == [f"ndarray:uint16:{seq_len + 1}"]


def test_pack_refuses_existing_and_overwrites(corpus, tmp_path):
    out = str(tmp_path / "ds")
    pack_text_to_mds(corpus, bundled_tokenizer_path(), 8, out)
    with pytest.raises(KilnDataError, match="already exists"):
        pack_text_to_mds(corpus, bundled_tokenizer_path(), 8, out)
    stats = pack_text_to_mds(corpus, bundled_tokenizer_path(), 16, out, overwrite=True)
    assert read_meta(out)["seq_len"] == 16 and read_meta(out)["samples"] == stats.samples
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt.gz", "ds", "t"]  # no temp dirs left


def test_interrupted_write_leaves_nothing(tmp_path):
    def samples():
        for i in range(100):
            if i == 50:
                raise KeyboardInterrupt  # stands in for a kill in the middle of preparation
            yield np.full(9, i, dtype=np.uint16)

    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        write_samples_to_mds(samples(), str(out), sample_len=9, vocab_size=4096, size_limit=256)
    assert not out.exists() and os.listdir(tmp_path) == ["t"]


def test_leftover_temp_dir_is_not_a_dataset(tmp_path):
    # What a SIGKILL during preparation leaves: shards and even an index, under the temp name.
    leftover = tmp_path / f".ds{TMP_MARK}abc123"
    leftover.mkdir()
    (leftover / "index.json").write_text("{}")
    (leftover / META_FILE).write_text("{}")
    assert not is_complete_dataset(str(tmp_path / "ds"))
    n = write_samples_to_mds((np.arange(9, dtype=np.uint16) for _ in range(3)), str(tmp_path / "ds"),
                             sample_len=9, vocab_size=4096)
    assert n == 3 and is_complete_dataset(str(tmp_path / "ds"))


def test_too_little_text(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("tiny", encoding="utf-8")
    with pytest.raises(KilnDataError, match="shorter than one sample"):
        pack_text_to_mds([str(src)], bundled_tokenizer_path(), 64, str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()
