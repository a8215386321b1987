"""Tokenizer: the bundled BPE, training one, loading only from local files."""

import os

import pytest

from kiln.data.tokenizer import (EOS_TOKEN, bundled_corpus_path, bundled_tokenizer_path, load_tokenizer,
                                 train_bpe_tokenizer)
from kiln.errors import KilnDataError


def test_bundled_assets_exist():
    assert os.path.getsize(bundled_corpus_path()) > 500_000
    assert os.path.isfile(bundled_tokenizer_path())


def test_bundled_round_trip_and_eos():
    tok = load_tokenizer(bundled_tokenizer_path())
    assert tok.vocab_size == 4096
    assert tok.eos_id == tok.pad_id == 0
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    texts = ["In the beginning God created the heaven and the earth.", "naïve café ✓ 12345\n\ttabs  spaces", ""]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    # BPE learned the corpus: common words are one token each.
    assert len(tok.encode("And the LORD said")) <= 5


def test_train_small_tokenizer(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("the quick brown fox jumps over the lazy dog\n\n" * 50, encoding="utf-8")
    path = train_bpe_tokenizer([str(src)], 300, str(tmp_path / "tok"))
    assert path == str(tmp_path / "tok" / "tokenizer.json")
    tok = load_tokenizer(path)
    assert 257 < tok.vocab_size <= 300 and tok.eos_id == 0  # a tiny text runs out of merges
    assert tok.decode(tok.encode("lazy fox, unseen: Zürich")) == "lazy fox, unseen: Zürich"


def test_missing_tokenizer_names_path(tmp_path):
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(KilnDataError, match="nope/tokenizer.json"):
        load_tokenizer(missing)


def test_bad_training_inputs(tmp_path):
    with pytest.raises(KilnDataError, match="vocab_size"):
        train_bpe_tokenizer([bundled_corpus_path()], 100, str(tmp_path))
    with pytest.raises(KilnDataError, match="missing.txt"):
        train_bpe_tokenizer([str(tmp_path / "missing.txt")], 300, str(tmp_path))
