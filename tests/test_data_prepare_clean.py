"""Cleaning: each Gopher heuristic drops what it should and keeps clean prose; PII; the config."""

from __future__ import annotations

from collections import Counter

import pytest

from kiln.data.prepare.config import PiiConfig, QualityConfig, load_prepare_config
from kiln.data.prepare.pii import scrub
from kiln.data.prepare.quality import quality_reasons
from kiln.data.prepare.text import dedup_words, normalize_unicode
from kiln.errors import KilnConfigError
from tests.test_data_prepare_common import PROSE, prose


def reason(doc: str, cfg: QualityConfig | None = None) -> str | None:
    return quality_reasons([doc], [dedup_words(doc)], cfg or QualityConfig())[0]


def test_clean_prose_is_kept():
    # (Some KJV chapters, the genealogies, are rightly dropped by dup_5gram: "and he begat ...".)
    docs = [prose(i) for i in range(20)] + [PROSE, PROSE.replace(". ", ".\n")]
    reasons = quality_reasons(docs, [dedup_words(d) for d in docs], QualityConfig())
    assert reasons == [None] * len(docs)


def _lines(words_per_line: list[str]) -> str:
    return "\n".join(words_per_line)


BAD = {
    "too_few_words": "the cat and the dog sat with me.",
    "too_many_words": " ".join(prose(i) for i in range(900)),  # > 100k words
    "mean_word_length": " ".join(["a", "to", "be", "of", "it", "the", "and", "is", "we"] * 10),
    "symbol_word_ratio": prose(1) + " " + " ".join(["#tag"] * 20),
    "bullet_lines": "\n".join(f"• {line}" for line in prose(2).split("\n")),
    "ellipsis_lines": "\n".join(f"{line} ..." if i % 2 else line for i, line in enumerate(prose(3).split("\n"))),
    "alpha_words": prose(4) + " " + " ".join(str(1000 + i) for i in range(60)),
    "stop_words": " ".join(w for w in prose(5).split() if w.lower().strip(".,") not in
                           {"the", "be", "to", "of", "and", "that", "have", "with"}),
    "dup_lines": "\n".join([prose(6)] + ["buy cheap shoes online now from our store today"] * 6),
    "dup_paragraphs": "\n\n".join([prose(7), "short repeated paragraph here", prose(8)]
                                  + ["short repeated paragraph here"] * 2),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_simple_heuristic_drops_its_case(name):
    assert reason(BAD[name]) == name


def test_repetition_heuristics():
    base = prose(11).split()
    # One bigram repeated a lot: top 2-gram fraction, nothing longer repeats.
    spam = base[:60] + [w for i in range(60) for w in ("cheap shoes", f"item{i}")[0].split() + [f"x{i}"]]
    assert reason(" ".join(spam)) == "top_2gram"
    # A 12-word passage copied three times inside a document: duplicated 5..10-grams.
    passage = "when the evening came the traveller counted his coins beside the fire".split()
    doc = base + passage + base[:5] + passage + ["then"] + passage
    r = reason(" ".join(doc))
    assert r is not None and (r.startswith("dup_") or r.startswith("top_")), r
    # Limits are configurable: switching all repetition checks off keeps it.
    off = QualityConfig(**{f"max_top_{n}gram_char_frac": 1.0 for n in (2, 3, 4)},
                        **{f"max_dup_{n}gram_char_frac": 1.0 for n in range(5, 11)})
    assert reason(" ".join(doc), off) is None
    assert reason(BAD["mean_word_length"], QualityConfig(enabled=False)) is None


def test_dup_ngram_counts_each_character_once():
    from kiln.data.prepare.quality import _ngram_fractions
    from kiln.data.prepare.text import WordTable

    words = "a b c d e f a b c d e f".split()  # second half repeats the first
    fr = _ngram_fractions(WordTable([words]))
    assert fr["dup_5gram"][0] == pytest.approx(0.5)  # 6 of 12 characters, overlaps not double counted
    assert fr["dup_10gram"][0] == 0.0
    assert fr["top_2gram"][0] == pytest.approx(4 / 12)  # "a b" (2 chars) twice


def test_pii_scrubbing():
    counts: Counter = Counter()
    text = ("Write to jane.doe+news@example.co.uk or call +1 (555) 123-4567 / 555.987.6543; "
            "server 192.168.10.1 and fe80::1ff:fe23:4567:890a answered. "
            "Kept: version 1.2.3.4.5, 2023-10-15, 12:30:45, 10 000 000 people, std::vector, room 101.")
    out = scrub(text, PiiConfig(), counts)
    assert "<EMAIL>" in out and "jane.doe" not in out
    assert out.count("<PHONE>") == 2 and "123-4567" not in out
    assert out.count("<IP_ADDRESS>") == 2 and "192.168" not in out and "fe80" not in out
    for kept in ("1.2.3.4.5", "2023-10-15", "12:30:45", "10 000 000", "std::vector", "room 101"):
        assert kept in out
    assert counts == {"email": 1, "phone": 2, "ip": 2}
    only_email = scrub(text, PiiConfig(phone=False, ip=False), Counter())
    assert "<EMAIL>" in only_email and "192.168.10.1" in only_email and "123-4567" in only_email


def test_unicode_normalisation():
    assert normalize_unicode("e\u0301", "NFC") == "\u00e9"
    assert normalize_unicode("\ufb01", "NFKC") == "fi"
    assert normalize_unicode("\ufb01", "NFC") == "\ufb01"
    assert normalize_unicode("e\u0301", "none") == "e\u0301"


def test_config_errors_name_the_setting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quality:\n  min_word: 10\n")
    with pytest.raises(KilnConfigError, match=r"unknown setting 'quality.min_word'; did you mean 'quality.min_words'"):
        load_prepare_config(str(bad))
    bad.write_text("dedup:\n  bands: 40\n  rows: 4\n")
    with pytest.raises(KilnConfigError, match=r"dedup.bands\(40\) × dedup.rows\(4\) = 160 exceeds dedup.num_perm\(128\)"):
        load_prepare_config(str(bad))
    bad.write_text("normalize:\n  unicode: NFD\n")
    with pytest.raises(KilnConfigError, match="normalize.unicode"):
        load_prepare_config(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("fim:\n  rate: 0.5\npack:\n  seq_len: 64\n")
    cfg = load_prepare_config(str(good), seq_len=32, dedup="near")
    assert cfg.fim.rate == 0.5 and cfg.pack.seq_len == 32 and cfg.dedup.mode == "near"
