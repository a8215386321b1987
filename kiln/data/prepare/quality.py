"""Gopher quality and repetition heuristics (Rae et al. 2021, appendix A.1.1).

:func:`quality_reasons` returns, per document, None (keep) or the name of the first heuristic
that fails; the names are the keys of the ``dropped`` counts in ``stats.json``. Cheap per-line
and per-word checks run in Python per document; the n-gram repetition checks run vectorised
over the whole chunk (see :func:`_ngram_fractions`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import repeat

import numpy as np
import regex

from kiln.data.prepare.config import QualityConfig
from kiln.data.prepare.text import WordTable

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "‣", "●", "◦", "▪", "⁃", "–")
ELLIPSES = ("...", "…")
# A whitespace-delimited word without any letter; prose has few, so findall allocates little.
_NON_ALPHA_WORD = regex.compile(r"(?<!\S)[^\s\p{L}]+(?!\S)")
_PARAGRAPHS = re.compile(r"\n\s*\n")

# Order of the checks: the first failing one names the drop reason.
REASONS = (
    "too_few_words", "too_many_words", "mean_word_length", "symbol_word_ratio", "bullet_lines",
    "ellipsis_lines", "alpha_words", "stop_words", "dup_lines", "dup_paragraphs", "dup_line_chars",
    "dup_paragraph_chars", *(f"top_{n}gram" for n in (2, 3, 4)), *(f"dup_{n}gram" for n in range(5, 11)),
)


def _dup_fractions(parts: list[str], total_chars: int) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    distinct = set(parts)
    dup = len(parts) - len(distinct)
    dup_chars = sum(map(len, parts)) - sum(map(len, distinct))
    return dup / max(len(parts), 1), dup_chars / max(total_chars, 1)


def _count_reason(n: int, chars: int, hashes: int, ellipses: int, cfg: QualityConfig) -> str | None:
    """The checks on whitespace-split word counts: ``n`` words of ``chars`` characters in all."""
    if n < cfg.min_words:
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    mean_len = chars / max(n, 1)
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "mean_word_length"
    if n and max(hashes, ellipses) / n > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    return None


def _line_reason(doc: str, n: int, non_alpha: int, stop_words: int, cfg: QualityConfig) -> str | None:
    """The checks after :func:`_count_reason`, in order; ``non_alpha``: words without a letter
    (:data:`_NON_ALPHA_WORD`), ``stop_words``: distinct :data:`STOP_WORDS` among the dedup words."""
    lines = list(filter(None, map(str.strip, doc.split("\n"))))
    n_lines = max(len(lines), 1)
    if sum(map(str.startswith, lines, repeat(BULLETS))) / n_lines > cfg.max_bullet_lines_frac:
        return "bullet_lines"
    if sum(map(str.endswith, lines, repeat(ELLIPSES))) / n_lines > cfg.max_ellipsis_lines_frac:
        return "ellipsis_lines"
    if n and (n - non_alpha) / n < cfg.min_alpha_words_frac:
        return "alpha_words"
    if cfg.min_stop_words and stop_words < cfg.min_stop_words:
        return "stop_words"
    line_frac, line_chars = _dup_fractions(lines, len(doc))
    paras = list(filter(None, map(str.strip, _PARAGRAPHS.split(doc))))
    para_frac, para_chars = _dup_fractions(paras, len(doc))
    if line_frac > cfg.max_dup_line_frac:
        return "dup_lines"
    if para_frac > cfg.max_dup_para_frac:
        return "dup_paragraphs"
    if line_chars > cfg.max_dup_line_char_frac:
        return "dup_line_chars"
    if para_chars > cfg.max_dup_para_char_frac:
        return "dup_paragraph_chars"
    return None


def _simple_reason(doc: str, words: list[str], cfg: QualityConfig) -> str | None:
    raw = doc.split()
    n = len(raw)
    reason = _count_reason(n, sum(map(len, raw)), doc.count("#"), doc.count("...") + doc.count("…"), cfg)
    if reason is not None:
        return reason
    return _line_reason(doc, n, len(_NON_ALPHA_WORD.findall(doc)), len(STOP_WORDS.intersection(words)), cfg)


_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it permutes uint64
_DOC_MIX = np.uint64(0xC2B2AE3D27D4EB4F)


def _group_counts(key: np.ndarray, want_not_first: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Per element: how many elements share its key; and (optionally) whether an earlier one does.

    What ``np.unique(..., return_index, return_inverse, return_counts)`` gives. Most n-grams of
    a document occur once, so a counting pass over hash buckets (the key's top bits) finds the
    elements alone in their bucket, which are unique; one stable argsort groups the others.
    """
    n = len(key)
    c = np.ones(n, dtype=np.int64)
    not_first = np.zeros(n, dtype=bool) if want_not_first else None
    if n > 4096:
        bits = int(n).bit_length() + 2  # >= 4n buckets
        bucket = (key >> np.uint64(64 - bits)).astype(np.int64)
        maybe = np.flatnonzero(np.bincount(bucket, minlength=1 << bits)[bucket] >= 2)
    else:
        maybe = np.arange(n)
    if len(maybe) == 0:
        return c, not_first
    order = np.argsort(key[maybe], kind="stable")
    ks = key[maybe][order]
    new_group = np.empty(len(ks), dtype=bool)
    new_group[0] = True
    np.not_equal(ks[1:], ks[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.append(starts, len(ks)))
    c[maybe[order]] = np.repeat(sizes, sizes)
    if want_not_first:  # the stable sort puts each key's first occurrence first in its group
        later = np.ones(len(ks), dtype=bool)
        later[starts] = False
        not_first[maybe[order[later]]] = True
    return c, not_first


_NGRAM_BLOCK = 1 << 16  # words per sort: small sorts stay in cache (documents are never split)


def _ngram_fractions(table: WordTable) -> dict[str, np.ndarray]:
    """Per document: ``top_{2,3,4}gram`` and ``dup_{5..10}gram`` character fractions (see
    :func:`_ngram_fractions_block`), over blocks of whole documents of about 64k words."""
    if len(table.ids) <= _NGRAM_BLOCK or table.n_docs <= 1:
        return _ngram_fractions_block(table)
    block = table.offsets[:-1] // _NGRAM_BLOCK  # by the block its first word falls in
    cuts = [0, *(np.flatnonzero(np.diff(block)) + 1).tolist(), table.n_docs]
    parts = []
    for d0, d1 in zip(cuts, cuts[1:]):
        a, b = int(table.offsets[d0]), int(table.offsets[d1])
        parts.append(_ngram_fractions_block(WordTable.from_arrays(
            table.ids[a:b], table.length[a:b], table.counts[d0:d1], table._hash_of_id)))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _ngram_fractions_block(table: WordTable) -> dict[str, np.ndarray]:
    """Per document: ``top_{2,3,4}gram`` and ``dup_{5..10}gram`` character fractions.

    top-n: characters of the most frequent n-gram (if it occurs more than once) × its count.
    dup-n: characters of words covered by an n-gram occurrence that repeats an earlier one
    (each character counted once, however many repeated n-grams overlap it).
    Denominator: all word characters of the document.

    One sort per n over candidate positions only: an (n+1)-gram can repeat only where its
    leading n-gram repeats, so the candidates shrink fast after the bigrams.
    """
    n_words, n_docs = len(table.ids), table.n_docs
    total = np.maximum(table.chars_per_doc(), 1)
    cs = np.zeros(n_words + 1, dtype=np.int64)
    np.cumsum(table.length, out=cs[1:])
    word_h = table.ngram_keys()
    out: dict[str, np.ndarray] = {}
    # Bigram starts: every word but the last of its document.
    ok = np.ones(n_words, dtype=bool)
    ok[table.offsets[1:][table.counts > 0] - 1] = False
    cand = np.flatnonzero(ok)
    h = word_h[ok]
    with np.errstate(over="ignore"):
        for n in range(2, 11):
            if n > 2:
                last = cand + n - 1
                ok = last < n_words
                ok[ok] = table.doc[last[ok]] == table.doc[cand[ok]]
                cand, h = cand[ok], h[ok]
            h = h * _MIX + word_h[cand + n - 1]
            doc = table.doc[cand]
            key = h ^ (doc.astype(np.uint64) * _DOC_MIX)
            frac = np.zeros(n_docs)
            if len(cand):
                c, not_first = _group_counts(key, want_not_first=n > 4)
                if n <= 4:
                    chars = cs[cand + n] - cs[cand]
                    # Most frequent first, then longest: pack (count, chars) into one sortable int.
                    score = np.where(c >= 2, (c << 24) | np.minimum(chars, (1 << 24) - 1), 0)
                    # cand ascends, so each document's candidates are one run: max per run.
                    run = np.flatnonzero(np.diff(doc, prepend=-1))
                    best = np.zeros(n_docs, dtype=np.int64)
                    best[doc[run]] = np.maximum.reduceat(score, run)
                    frac = (best >> 24) * (best & ((1 << 24) - 1)) / total
                else:
                    # Repeats cover [start, start + n) each; starts ascend, so each one adds the
                    # characters from the end of the previous one (or its own start) to its end.
                    starts = cand[not_first]
                    frm = starts.copy()
                    frm[1:] = np.maximum(starts[1:], starts[:-1] + n)
                    covered = np.zeros(n_docs, dtype=np.int64)
                    np.add.at(covered, table.doc[starts], cs[starts + n] - cs[frm])
                    frac = covered / total
                keep = c >= 2
                cand, h = cand[keep], h[keep]
            out[f"top_{n}gram" if n <= 4 else f"dup_{n}gram"] = frac
    return out


def quality_reasons(docs: list[str], words: list[list[str]], cfg: QualityConfig) -> list[str | None]:
    """None to keep a document, or the name of the first heuristic it fails."""
    if not cfg.enabled:
        return [None] * len(docs)
    reasons = [_simple_reason(d, w, cfg) for d, w in zip(docs, words)]
    return _repetition_reasons(reasons, lambda alive: WordTable([words[i] for i in alive]), cfg)


def quality_reasons_from_counts(docs: list[str], n_words: list[int], chars: list[int], hashes: list[int],
                                ellipses: list[int], non_alpha: list[int], stop_words: list[int],
                                word_table: Callable[[list[int]], WordTable], cfg: QualityConfig) -> list[str | None]:
    """:func:`quality_reasons` from per-document counts computed elsewhere (see :mod:`.segments`):
    whitespace-split words and their characters, '#', ellipses, words without a letter, distinct
    stop words; ``word_table(indices)``: the dedup words of those documents."""
    if not cfg.enabled:
        return [None] * len(docs)
    reasons = []
    for doc, n, c, h, e, a, s in zip(docs, n_words, chars, hashes, ellipses, non_alpha, stop_words):
        r = _count_reason(n, c, h, e, cfg)
        reasons.append(r if r is not None else _line_reason(doc, n, a, s, cfg))
    return _repetition_reasons(reasons, word_table, cfg)


def _repetition_reasons(reasons: list[str | None], word_table: Callable[[list[int]], WordTable],
                        cfg: QualityConfig) -> list[str | None]:
    alive = [i for i, r in enumerate(reasons) if r is None]
    if not alive:
        return reasons
    fracs = _ngram_fractions(word_table(alive))
    limits = {**{f"top_{n}gram": v for n, v in cfg.top_ngram_limits().items()},
              **{f"dup_{n}gram": v for n, v in cfg.dup_ngram_limits().items()}}
    for name, limit in limits.items():  # in REASONS order
        for j in np.flatnonzero(fracs[name] > limit):
            i = alive[j]
            if reasons[i] is None:
                reasons[i] = name
    return reasons
