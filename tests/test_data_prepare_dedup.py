"""Deduplication with planted exact and near duplicates: recall and precision on true Jaccard."""

from __future__ import annotations

import numpy as np

from kiln.data.prepare.config import DedupConfig
from kiln.data.prepare.dedup import decide_exact, decide_near, exact_hashes, minhash_signatures
from kiln.data.prepare.text import WordTable, dedup_words
from tests.test_data_prepare_common import kjv_chapters


def shingles(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def mutate(words: list[str], frac: float, rng: np.random.Generator) -> list[str]:
    words = list(words)
    for i in rng.choice(len(words), size=max(1, int(len(words) * frac)), replace=False):
        words[i] = f"zz{rng.integers(1 << 30)}"
    return words


def planted_corpus(seed: int = 0) -> list[str]:
    """150 distinct chapters; then exact copies (case, punctuation, spacing changed), near copies
    (1-3% of words changed: Jaccard ~0.8-0.95) and distant relatives (20-40% changed: < 0.5)."""
    rng = np.random.default_rng(seed)
    base = kjv_chapters(150)
    docs = list(base)
    for _ in range(40):
        src = base[rng.integers(len(base))]
        docs.append("  " + src.upper().replace(",", " ,").replace(" ", "   ") + "!!")
    for _ in range(60):
        words = base[rng.integers(len(base))].split()
        docs.append(" ".join(mutate(words, rng.uniform(0.005, 0.03), rng)))
    for _ in range(40):
        words = base[rng.integers(len(base))].split()
        docs.append(" ".join(mutate(words, rng.uniform(0.2, 0.4), rng)))
    order = rng.permutation(len(docs) - 20) + 20  # shuffle all but the first 20 originals
    return docs[:20] + [docs[i] for i in order]


def test_planted_duplicates_recall_and_precision():
    cfg = DedupConfig(mode="near")
    docs = planted_corpus()
    words = [dedup_words(d) for d in docs]
    keep = decide_exact(exact_hashes(words))
    survivors = np.flatnonzero(keep)
    # Signatures from two "workers" (halves) must equal those of one: they are per document.
    half = len(words) // 2
    sig = np.concatenate([minhash_signatures(WordTable(words[:half]), cfg),
                          minhash_signatures(WordTable(words[half:]), cfg)])
    assert np.array_equal(sig, minhash_signatures(WordTable(words), cfg))
    near_keep = decide_near(sig[survivors], cfg)
    keep[survivors[~near_keep]] = False

    sh = [shingles(w, cfg.shingle_size) for w in words]
    n = len(docs)
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(i):
            sim[j, i] = jaccard(sh[i], sh[j])  # sim[earlier, later]
    # Recall: of every pair with Jaccard >= 0.8, the later document is gone.
    pairs = [(i, j) for j in range(n) for i in range(j) if sim[i, j] >= 0.8]
    assert len(pairs) >= 90, len(pairs)  # the 100 planted copies (a few land before their source)
    caught = sum(not keep[j] for i, j in pairs)
    assert caught / len(pairs) >= 0.95, (caught, len(pairs))
    # Precision: no dropped document's best earlier match is below 0.5.
    for j in np.flatnonzero(~keep):
        assert sim[:j, j].max() >= 0.5, (j, sim[:j, j].max())
    # The distant relatives (< 0.5 to everything) are all kept.
    for j in range(n):
        if sim[:j, j].max(initial=0) < 0.5:
            assert keep[j]


def test_exact_dedup_keeps_the_first_occurrence():
    docs = ["Hello, World!", "another one", "hello   world", "HELLO WORLD.", "another one!"]
    keep = decide_exact(exact_hashes([dedup_words(d) for d in docs]))
    assert keep.tolist() == [True, True, False, False, False]


def test_near_dedup_is_deterministic_and_keeps_first():
    cfg = DedupConfig(mode="near")
    docs = kjv_chapters(30)
    docs = docs + [" ".join(mutate(docs[3].split(), 0.01, np.random.default_rng(1)))]
    docs = [docs[-1]] + docs[:-1]  # the copy comes first now: the original (index 4) is dropped
    sig = minhash_signatures(WordTable([dedup_words(d) for d in docs]), cfg)
    keep = decide_near(sig, cfg)
    assert np.flatnonzero(~keep).tolist() == [4]
    assert np.array_equal(keep, decide_near(sig.copy(), cfg))
