"""Gopher quality and repetition heuristics (Rae et al. 2021, appendix A.1.1).

:func:`quality_reasons` returns, per document, None (keep) or the name of the first heuristic
that fails; the names are the keys of the ``dropped`` counts in ``stats.json``. Cheap per-line
and per-word checks run in Python per document; the n-gram repetition checks run vectorised
over the whole chunk (see :func:`_ngram_fractions`).
"""

from __future__ import annotations

import re

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
    seen: set[str] = set()
    dup, dup_chars = 0, 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    return dup / max(len(parts), 1), dup_chars / max(total_chars, 1)


def _simple_reason(doc: str, words: list[str], cfg: QualityConfig) -> str | None:
    raw = doc.split()
    n = len(raw)
    if n < cfg.min_words:
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    mean_len = sum(map(len, raw)) / max(n, 1)
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "mean_word_length"
    hashes = doc.count("#")
    ellipses = doc.count("...") + doc.count("…")
    if n and max(hashes, ellipses) / n > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = [line.strip() for line in doc.split("\n")]
    lines = [line for line in lines if line]
    n_lines = max(len(lines), 1)
    if sum(line.startswith(BULLETS) for line in lines) / n_lines > cfg.max_bullet_lines_frac:
        return "bullet_lines"
    if sum(line.endswith(ELLIPSES) for line in lines) / n_lines > cfg.max_ellipsis_lines_frac:
        return "ellipsis_lines"
    if n and (n - len(_NON_ALPHA_WORD.findall(doc))) / n < cfg.min_alpha_words_frac:
        return "alpha_words"
    if cfg.min_stop_words and len(STOP_WORDS.intersection(words)) < cfg.min_stop_words:
        return "stop_words"
    line_frac, line_chars = _dup_fractions(lines, len(doc))
    paras = [p.strip() for p in _PARAGRAPHS.split(doc) if p.strip()]
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


_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it permutes uint64
_DOC_MIX = np.uint64(0xC2B2AE3D27D4EB4F)


def _ngram_fractions(table: WordTable) -> dict[str, np.ndarray]:
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
    word_h = table.ids.astype(np.uint64) * _MIX
    out: dict[str, np.ndarray] = {}
    cand = np.arange(n_words, dtype=np.int64)
    h = word_h.copy()
    with np.errstate(over="ignore"):
        for n in range(2, 11):
            last = cand + n - 1
            ok = last < n_words
            ok[ok] = table.doc[last[ok]] == table.doc[cand[ok]]
            cand, h = cand[ok], h[ok]
            h = h * _MIX + word_h[cand + n - 1]
            key = h ^ (table.doc[cand].astype(np.uint64) * _DOC_MIX)
            frac = np.zeros(n_docs)
            if len(cand):
                # return_index (the first occurrence) needs a stable sort; only dup-n uses it.
                _, *rest = np.unique(key, return_index=n > 4, return_inverse=True, return_counts=True)
                first, inv, counts = rest if n > 4 else (None, *rest)
                c = counts[inv]
                if n <= 4:
                    chars = cs[cand + n] - cs[cand]
                    # Most frequent first, then longest: pack (count, chars) into one sortable int.
                    score = np.where(c >= 2, (c << 24) | np.minimum(chars, (1 << 24) - 1), 0)
                    best = np.zeros(n_docs, dtype=np.int64)
                    np.maximum.at(best, table.doc[cand], score)
                    frac = (best >> 24) * (best & ((1 << 24) - 1)) / total
                else:
                    starts = cand[first[inv] != np.arange(len(cand))]
                    diff = (np.bincount(starts, minlength=n_words + 1)
                            - np.bincount(starts + n, minlength=n_words + 1))
                    covered = np.cumsum(diff[:n_words]) > 0
                    frac = table.chars_per_doc(covered) / total
                keep = c >= 2
                cand, h = cand[keep], h[keep]
            out[f"top_{n}gram" if n <= 4 else f"dup_{n}gram"] = frac
    return out


def quality_reasons(docs: list[str], words: list[list[str]], cfg: QualityConfig) -> list[str | None]:
    """None to keep a document, or the name of the first heuristic it fails."""
    if not cfg.enabled:
        return [None] * len(docs)
    reasons = [_simple_reason(d, w, cfg) for d, w in zip(docs, words)]
    alive = [i for i, r in enumerate(reasons) if r is None]
    if not alive:
        return reasons
    fracs = _ngram_fractions(WordTable([words[i] for i in alive]))
    limits = {**{f"top_{n}gram": v for n, v in cfg.top_ngram_limits().items()},
              **{f"dup_{n}gram": v for n, v in cfg.dup_ngram_limits().items()}}
    for name, limit in limits.items():  # in REASONS order
        for j in np.flatnonzero(fracs[name] > limit):
            i = alive[j]
            if reasons[i] is None:
                reasons[i] = name
    return reasons
