"""The worker's fast path (segment table, vectorised counts) equals the per-document reference.

:mod:`kiln.data.prepare.segments` cuts documents into cached segments; these tests compare what
it computes (token ids, Gopher counts and reasons, dedup words and exact hashes, MinHash) with
``tokenizers`` itself and with the per-document functions, on adversarial text: every kind of
whitespace the pre-tokenizer and Python disagree on, runs of spaces and newlines, final sigma,
combining marks, scripts without spaces, special tokens.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import regex

from kiln.data.prepare import pii
from kiln.data.prepare.config import DedupConfig, PiiConfig, QualityConfig
from kiln.data.prepare.dedup import exact_hashes, minhash_signatures
from kiln.data.prepare.encode import DocEncoder
from kiln.data.prepare.pii import scrub
from kiln.data.prepare.quality import _ngram_fractions, quality_reasons, quality_reasons_from_counts
from kiln.data.prepare.segments import (ELLIPSES, ENGINE_WHITESPACE, HASHES, NON_ALPHA, RAW_CHARS, RAW_WORDS,
                                        SegmentTable)
from kiln.data.prepare.text import WordTable, dedup_words
from kiln.data.tokenizer import bundled_tokenizer_path
from tests.test_data_prepare_common import PROSE, kjv_chapters, prose

_ALPHABET = (list("abcXYZ019'.,;:!?-#…()@") + [" "] * 12 + ["\n"] * 5 + ["\t", "\r", "\x0b", "\x0c", "\x1c", "\x1f",
             "\x85", "\xa0", "\u2000", "\u2028", "\u3000", "\u200b", "Σ", "σ", "İ", "ß", "e\u0301", "中文", "😀",
             "٣", "...", "'s", "'t", " '", "<|endoftext|>"])


def fuzz_docs(n: int, seed: int = 0, max_len: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(_ALPHABET, size=int(rng.integers(1, max_len)))) for _ in range(n)]


def tricky_docs() -> list[str]:
    ws = sorted(ENGINE_WHITESPACE) + ["\x1c", "\x1d", "\x1e", "\x1f", "\u200b", "\u180e"]
    docs = []
    for w in ws:
        docs += [f"a{w}b", f"a {w}b", f"a{w} b", f"a {w} b", f"{w}a", f"a{w}", f" {w}", f"{w} ", f"a{w}{w}b c",
                 f"x.\n{w}y", f"x {w}\ny z", f"{w}\n{w}"]
    docs += ["  leading", "trailing  ", "a  b   c    d", " \n \n ", "\n\nx\n\n", "x\r\ny\r\n", "x \ny", "x\n y",
             "ΟΔΟΣ ΟΔΟΣ. ΣΑΣ\nΣ Σ", "İstanbul İİ", "don't it's 'tis we'll", "#tag ##x ... … ....",
             "中文没有空格的句子。再来一句", "a <|endoftext|> b", "<|endoftext|>", "e\u0301 e\u0301e\u0301"]
    return docs


@pytest.fixture(scope="module")
def encoder() -> DocEncoder:
    return DocEncoder(bundled_tokenizer_path())


def test_engine_whitespace_is_the_pretokenizers():
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    assert set(regex.findall(r"\s", every)) == set(ENGINE_WHITESPACE)


def _check_table(table: SegmentTable, docs: list[str], encoder: DocEncoder) -> None:
    segs = table.segment(docs)
    # Every cut is a pre-token boundary of tokenizers' own pre-tokenizer (ids alone could hide a
    # wrong cut: a small vocabulary may encode "\n " and "\n", " " alike).
    text_of = {i: t for t, i in table._exact.items()}
    pre = encoder._tok.pre_tokenizer
    for i, doc in enumerate(docs):
        pieces = [text_of[j] for j in segs.sid[segs.offsets[i]: segs.offsets[i + 1]].tolist()]
        assert "".join(pieces) == doc
        assert [p for seg in pieces for p, _ in pre.pre_tokenize_str(seg)] == [p for p, _ in pre.pre_tokenize_str(doc)], \
            (repr(doc), pieces)
    everything = np.arange(len(docs))
    tokens, per_doc = segs.tokens(everything)
    bounds = np.concatenate([[0], np.cumsum(per_doc)])
    words = [dedup_words(d) for d in docs]
    for i, doc in enumerate(docs):
        ids = tokens[bounds[i]: bounds[i + 1]].tolist()
        if not encoder.has_special(doc):  # (the worker encodes those with tokenizers)
            assert ids == encoder._tok.encode(doc, add_special_tokens=False).ids, repr(doc)
        raw = doc.split()
        assert segs.sums(RAW_WORDS)[i] == len(raw), repr(doc)
        assert segs.sums(RAW_CHARS)[i] == sum(map(len, raw)), repr(doc)
        assert segs.sums(HASHES)[i] == doc.count("#")
        assert segs.sums(ELLIPSES)[i] == doc.count("...") + doc.count("…")
        assert segs.sums(NON_ALPHA)[i] == len(regex.findall(r"(?<!\S)[^\s\p{L}]+(?!\S)", doc)), repr(doc)
    stop = segs.stop_words()
    table_words = segs.word_table(everything)
    assert [table.word_list[j] for j in table_words.ids] == [w for ws in words for w in ws]
    assert table_words.counts.tolist() == [len(w) for w in words]
    assert stop.tolist() == [len({"the", "be", "to", "of", "and", "that", "have", "with"} & set(w)) for w in words]
    assert np.array_equal(segs.exact_hashes(table_words), exact_hashes(words))


def test_segments_equal_tokenizers_and_per_document_counts(encoder):
    table = SegmentTable(encoder)
    docs = tricky_docs() + fuzz_docs(400) + [prose(i) for i in range(5)] + [PROSE]
    _check_table(table, docs, encoder)
    _check_table(table, docs[::-1], encoder)  # warm table, other order
    _check_table(SegmentTable(encoder), fuzz_docs(300, seed=1, max_len=400), encoder)


def test_fast_quality_reasons_equal_reference(encoder):
    docs = ([prose(i) for i in range(30)] + kjv_chapters(30) + tricky_docs() + fuzz_docs(200, seed=2, max_len=600)
            + [" ".join(["a", "to", "be", "of", "it", "the", "and", "is", "we"] * 10),
               "\n".join(f"• {line}" for line in prose(2).split("\n")), "buy now " * 30,
               "\n\n".join([prose(7), "short repeated paragraph here", prose(8)] + ["short repeated paragraph here"] * 2)])
    words = [dedup_words(d) for d in docs]
    configs = [QualityConfig(), QualityConfig(min_words=0, min_stop_words=0, min_alpha_words_frac=0.0),
               QualityConfig(min_words=1, max_mean_word_length=100.0, max_symbol_word_ratio=1.0)]
    table = SegmentTable(encoder)
    segs = table.segment(docs)
    for cfg in configs:
        fast = quality_reasons_from_counts(
            docs, *(segs.sums(c).tolist() for c in (RAW_WORDS, RAW_CHARS, HASHES, ELLIPSES, NON_ALPHA)),
            segs.stop_words().tolist(), lambda alive: segs.word_table(np.asarray(alive, dtype=np.int64)), cfg)
        assert fast == quality_reasons(docs, words, cfg)
        assert sum(r is None for r in fast) > 5 and len(set(fast)) > 3


def test_minhash_and_ngrams_from_the_table_equal_reference(encoder):
    docs = kjv_chapters(40) + [prose(i) for i in range(10)]
    docs += [docs[3].upper(), docs[5].replace(" the ", " a ", 3)]
    table = SegmentTable(encoder)
    table.segment(fuzz_docs(50, seed=3))  # ids of the table differ from a fresh WordTable's
    segs = table.segment(docs)
    words = [dedup_words(d) for d in docs]
    fast = segs.word_table(np.arange(len(docs)))
    cfg = DedupConfig(mode="near")
    assert np.array_equal(minhash_signatures(fast, cfg), minhash_signatures(WordTable(words), cfg))
    ref = _ngram_fractions(WordTable(words))
    got = _ngram_fractions(fast)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_ngram_fractions_blocks_and_repeats():
    rng = np.random.default_rng(5)
    # Small vocabularies: many repeated n-grams, overlapping repeats, documents of all sizes,
    # more words than one sort block.
    words = [[f"w{x}" for x in rng.integers(0, k, size=int(n))]
             for k, n in zip(rng.integers(2, 40, size=600), rng.integers(0, 400, size=600))]
    table = WordTable(words)
    assert len(table.ids) > (1 << 16)
    got = _ngram_fractions(table)
    for i in rng.choice(len(words), size=40, replace=False).tolist():
        one = _ngram_fractions(WordTable([words[i]]))
        assert all(got[k][i] == one[k][0] for k in one)


def test_pii_hints_keep_every_match():
    rng = np.random.default_rng(7)
    alphabet = list("0123456789..--::  ()+@aAfF\n") + ["fe80", "::1", "192.168.", "user@", "example.com", "٣"]
    docs = ["".join(rng.choice(alphabet, size=int(rng.integers(5, 80)))) for _ in range(3000)]
    for d in docs:  # the hints must never skip a replacement the full regexes make
        ref = d
        if "@" in ref:
            ref = pii._EMAIL.sub(pii.EMAIL, ref)
        digits = pii._digits(ref)
        if digits >= 4 and "." in ref:
            ref = pii._IPV4.sub(pii.IP_ADDRESS, ref)
        if "::" in ref or ref.count(":") >= 7:
            ref = pii._IPV6.sub(lambda m: pii._ipv6(m, Counter()), ref)
        if digits >= 8:
            ref = pii._PHONE.sub(lambda m: pii._phone(m, Counter()), ref)
        assert scrub(d, PiiConfig(), Counter()) == ref, repr(d)
