"""Text normalisation shared by the quality filters and deduplication, and a vectorised word table.

Both Gopher's repetition heuristics and the dedup hashes look at the same "words": the text
lowercased, Unicode punctuation removed, split on whitespace. Computing them once per chunk and
turning them into integer arrays lets the n-gram work run in numpy instead of per-word Python.
"""

from __future__ import annotations

import hashlib
import itertools
import unicodedata

import numpy as np
import regex

_PUNCT = regex.compile(r"\p{P}+")


def normalize_unicode(text: str, form: str) -> str:
    if form == "none":
        return text
    return unicodedata.normalize(form, text)


def dedup_words(text: str) -> list[str]:
    """Lowercased, punctuation-stripped, whitespace-split words (what dedup and repetition see)."""
    return _PUNCT.sub("", text.lower()).split()


def stable_hash64(word: str) -> int:
    """A 64-bit hash that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


class WordTable:
    """All words of a list of documents as flat numpy arrays.

    ``ids[i]``: an integer equal for equal words (within this table only); ``doc[i]``: the
    document of word i; ``length[i]``: its length in characters; ``offsets``: document starts.
    """

    def __init__(self, words_per_doc: list[list[str]]) -> None:
        counts = np.fromiter(map(len, words_per_doc), dtype=np.int64, count=len(words_per_doc))
        self.n_docs = len(words_per_doc)
        self.offsets = np.zeros(self.n_docs + 1, dtype=np.int64)
        np.cumsum(counts, out=self.offsets[1:])
        n = int(self.offsets[-1])
        flat = list(itertools.chain.from_iterable(words_per_doc))
        # setdefault with a running counter: the id of a word is the position of its first
        # occurrence, so equal words share an id; the loop runs in C (no Python frame per word).
        self._first: dict[str, int] = {}
        self.ids = np.fromiter(map(self._first.setdefault, flat, itertools.count()), dtype=np.int64, count=n)
        self.length = np.fromiter(map(len, flat), dtype=np.int64, count=n)
        self.doc = np.repeat(np.arange(self.n_docs, dtype=np.int64), counts)
        self.counts = counts
        self._hash_of_id: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, ids: np.ndarray, length: np.ndarray, counts: np.ndarray,
                    hash_of_id: np.ndarray | None = None) -> WordTable:
        """A table from word ids already assigned elsewhere (equal words, equal ids).

        ``length``: characters per word; ``counts``: words per document; ``hash_of_id[i]``: the
        :func:`stable_hash64` of the word with id i (needed only by :meth:`stable_hashes`).
        """
        self = cls.__new__(cls)
        self.n_docs = len(counts)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.zeros(self.n_docs + 1, dtype=np.int64)
        np.cumsum(self.counts, out=self.offsets[1:])
        self.ids, self.length = ids, length
        self.doc = np.repeat(np.arange(self.n_docs, dtype=np.int64), self.counts)
        self._first = {}
        self._hash_of_id = hash_of_id
        return self

    def stable_hashes(self) -> np.ndarray:
        """Per word, a process-independent 64-bit hash (one blake2b per distinct word)."""
        if self._hash_of_id is not None:
            return self._hash_of_id[self.ids]
        table = np.zeros(len(self.ids) + 1, dtype=np.uint64)
        if self._first:
            first = np.fromiter(self._first.values(), dtype=np.int64, count=len(self._first))
            table[first] = np.fromiter(map(stable_hash64, self._first), dtype=np.uint64, count=len(self._first))
        return table[self.ids]

    def ngram_keys(self) -> np.ndarray:
        """Per word, the uint64 that n-gram hashes combine: equal for equal words. The stable
        hash when the table has one (then independent of how ids were assigned)."""
        if self._hash_of_id is not None:
            return self.stable_hashes()
        return self.ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)

    def chars_per_doc(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Characters of the words (those where ``mask``) per document, as int64."""
        weights = self.length if mask is None else self.length * mask
        cs = np.zeros(len(weights) + 1, dtype=np.int64)
        np.cumsum(weights, out=cs[1:])
        return cs[self.offsets[1:]] - cs[self.offsets[:-1]]
