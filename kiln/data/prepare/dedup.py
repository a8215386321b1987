"""Whole-dataset deduplication: per-chunk features in the workers, one global decision.

Workers compute, per kept document, a 128-bit hash of its normalised text (exact) and a MinHash
signature over word n-gram shingles (near). The global pass sees every document in order and
keeps the first occurrence: exact duplicates by hash; near duplicates by LSH banding (a pair is
a candidate when any band of its signatures matches) followed by a check of the estimated
Jaccard similarity against ``dedup.threshold``, so that a band collision alone never drops a
document. Only documents in a band bucket shared with another document reach the Python loop.

MinHash uses the multiply-shift family ``h_i(x) = (a_i·x + b_i) >> 32`` over 64-bit shingle
hashes (a_i odd): universal, and it vectorises in numpy without 128-bit arithmetic.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict

import numpy as np

from kiln.data.prepare.config import DedupConfig
from kiln.data.prepare.text import WordTable

log = logging.getLogger(__name__)

_MIX = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 512  # shingles per vectorised block: block × num_perm × 8 bytes of scratch (512 KiB at 128: in L2)


def exact_hash(words: list[str]) -> bytes:
    """16-byte hash of the lowercased, punctuation-stripped, whitespace-collapsed text."""
    return hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=16).digest()


def exact_hashes(words_per_doc: list[list[str]]) -> np.ndarray:
    """``[n_docs, 2]`` uint64."""
    raw = b"".join(exact_hash(w) for w in words_per_doc)
    return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2).copy()


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    # Fixed seed: signatures must agree across workers, runs and resumes.
    rng = np.random.default_rng(0x6B696C6E)  # "kiln"
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(table: WordTable, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash per shingle, its document). A document shorter than the shingle is one shingle."""
    word_h = table.stable_hashes()
    n_words = len(word_h)
    starts = table.offsets[:-1]
    counts = table.counts
    # Shingle k of a document starts at word start+k, for k < max(count - size + 1, 1).
    per_doc = np.where(counts > 0, np.maximum(counts - shingle_size + 1, 1), 0)
    doc = np.repeat(np.arange(table.n_docs, dtype=np.int64), per_doc)
    first = np.repeat(starts - np.concatenate([[0], np.cumsum(per_doc)[:-1]]), per_doc)
    pos = np.arange(len(doc), dtype=np.int64) + first
    end = np.repeat(starts + counts, per_doc)
    h = np.zeros(len(doc), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(shingle_size):
            idx = pos + k
            inside = idx < end  # short documents: fewer words than the shingle
            h = np.where(inside, h * _MIX + word_h[np.minimum(idx, max(n_words - 1, 0))], h)
    return h, doc


def minhash_signatures(table: WordTable, cfg: DedupConfig) -> np.ndarray:
    """``[n_docs, num_perm]`` uint32 MinHash signatures (all-ones for a document with no words)."""
    a, b = _permutations(cfg.num_perm)
    sig = np.full((table.n_docs, cfg.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    h, doc = shingle_hashes(table, cfg.shingle_size)
    scratch = np.empty((_BLOCK, cfg.num_perm), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, len(h), _BLOCK):
            hb, db = h[s:s + _BLOCK], doc[s:s + _BLOCK]
            perm = scratch[: len(hb)]  # [block, num_perm] = h * a + b, in place
            np.multiply(hb[:, None], a[None, :], out=perm)
            perm += b
            # Shingles of one document are contiguous: reduce each run, then merge into sig
            # (a document may span two blocks).
            run_starts = np.flatnonzero(np.concatenate([[True], db[1:] != db[:-1]]))
            mins = np.minimum.reduceat(perm, run_starts, axis=0)
            docs = db[run_starts]
            sig[docs] = np.minimum(sig[docs], mins)
    return (sig >> np.uint64(32)).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def decide_exact(hashes: np.ndarray) -> np.ndarray:
    """Keep mask: True for the first document with each hash."""
    keep = np.zeros(len(hashes), dtype=bool)
    if len(hashes):
        rows = np.ascontiguousarray(hashes).view([("a", np.uint64), ("b", np.uint64)]).ravel()
        _, first = np.unique(rows, return_index=True)  # return_index sorts stably: the first occurrence
        keep[first] = True
    return keep


def _band_keys(sig: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """``[n_docs, bands]`` uint64: one hash per band of ``rows`` signature values."""
    n = len(sig)
    bands = sig[:, : cfg.bands * cfg.rows].reshape(n, cfg.bands, cfg.rows).astype(np.uint64)
    keys = np.zeros((n, cfg.bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(cfg.rows):
            keys = keys * _MIX + bands[:, :, r] + np.uint64(r + 1)
    return keys


def decide_near(sig: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Keep mask over documents in order: drop a document whose signature matches a kept earlier one.

    A document is compared with the *kept* documents that share a band bucket with it, so a
    chain A~B~C with A and C dissimilar keeps C when B was dropped.
    """
    n = len(sig)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    keys = _band_keys(sig, cfg)
    # Per band, which documents share their bucket with another one: sort once per band.
    members: list[np.ndarray] = []  # per band: doc ids in shared buckets
    for band in range(cfg.bands):
        k = keys[:, band]
        order = np.argsort(k, kind="stable")
        ks = k[order]
        same_next = ks[1:] == ks[:-1]
        shared = np.zeros(n, dtype=bool)
        shared[:-1] |= same_next
        shared[1:] |= same_next
        members.append(order[shared])
    shared_docs = np.unique(np.concatenate(members)) if members else np.zeros(0, dtype=np.int64)
    if not len(shared_docs):
        return keep
    in_band = np.zeros((n, cfg.bands), dtype=bool)
    for band, docs in enumerate(members):
        in_band[docs, band] = True
    buckets: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(cfg.bands)]
    threshold = cfg.threshold
    need = int(np.ceil(threshold * cfg.num_perm - 1e-9))  # equal positions for estimate >= threshold
    for j in shared_docs.tolist():  # ascending: document order
        bands = np.flatnonzero(in_band[j]).tolist()
        sj = sig[j]
        dup = False
        checked: set[int] = set()
        for band in bands:
            for i in buckets[band].get(int(keys[j, band]), ()):
                if i in checked:
                    continue
                checked.add(i)
                if int(np.count_nonzero(sig[i] == sj)) >= need:
                    dup = True
                    break
            if dup:
                break
        if dup:
            keep[j] = False
        else:
            for band in bands:
                buckets[band][int(keys[j, band])].append(j)
    return keep
