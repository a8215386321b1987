r"""Documents as sequences of cached text segments: tokens, dedup words and word counts in numpy.

Prose repeats its words, so a worker analyses each distinct *segment* once and keeps the result.
A document is cut before every space followed by non-whitespace and before every newline that
follows non-whitespace ("Jesus wept.\nThen he" → "Jesus", " wept.", "\nThen", " he"). Each
segment has a row of features, its token ids and its dedup words (ids into a word table), so a
chunk costs one dict lookup per segment and a few numpy passes; the segments met for the first
time are analysed together, once per chunk.

Why the cuts change nothing:

* Tokens. Under the GPT-2 pre-tokenizer pattern (byte-level BPE, :mod:`.encode`) a pre-token
  holds either only whitespace, or no whitespace but one leading space. So a space followed by
  non-whitespace starts a pre-token (no alternative matches across it, and ``\s+(?!\S)``
  leaves the space to the next one), and so does whitespace after non-whitespace. A document's
  pre-tokens, and ids, are then its segments' concatenated. Where a space or newline follows
  whitespace, or a space ends the text, no cut is made: the segments around it are merged.
* Dedup words (lowercase, strip ``\p{P}``, split on whitespace), whitespace-split words, words
  without letters (:data:`.quality._NON_ALPHA_WORD`), '#' and ellipsis counts: all of them are
  per character or per whitespace-delimited word, and every cut falls next to whitespace, so a
  document's value is the sum (or concatenation) of its segments'. Case mapping (final sigma)
  does not look past whitespace.

The table is per worker process and only saves work: results never depend on what it already
holds (the tests compare with ``tokenizers`` and the per-document functions on adversarial text).
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np

from kiln.data.prepare.encode import DocEncoder
from kiln.data.prepare.quality import _NON_ALPHA_WORD, STOP_WORDS
from kiln.data.prepare.text import WordTable, dedup_words, stable_hash64

# Whitespace as the pre-tokenizer's regex engine sees it (``regex``'s and Oniguruma's ``\s``,
# Unicode White_Space; not Python's str.isspace, which adds U+001C..U+001F). Tests check it.
ENGINE_WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                              "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_STOP_BITS = {w: 1 << i for i, w in enumerate(sorted(STOP_WORDS))}
_MISSING, _MERGE = -1, -2  # not in the table yet; a cut that is no pre-token boundary
_STARTS_NEWLINE, _ENDS_WHITESPACE = 1, 2
_NO_ID = itertools.repeat(_MISSING)
# Start a fresh table past these sizes (memory, and int64 offsets stay small).
_MAX_SEGMENTS, _MAX_STORE = 1 << 21, 1 << 28

# Feature columns, one row per segment.
TOK_START, TOK_LEN, WORD_START, WORD_LEN, RAW_WORDS, RAW_CHARS, NON_ALPHA, HASHES, ELLIPSES, STOP = range(10)
_N_COLS = 10


def _starts_ok(part: str) -> bool:
    """A cut before ``part`` (after a space or newline) is a pre-token boundary."""
    return bool(part) and part[0] not in ENGINE_WHITESPACE


class _Grow:
    """A 1-D numpy array that grows at the end (amortised doubling)."""

    def __init__(self, dtype: type) -> None:
        self.a = np.zeros(1024, dtype=dtype)
        self.n = 0

    def extend(self, items: np.ndarray) -> None:
        need = self.n + len(items)
        if need > len(self.a):
            bigger = np.zeros(max(need, 2 * len(self.a)), dtype=self.a.dtype)
            bigger[: self.n] = self.a[: self.n]
            self.a = bigger
        self.a[self.n: need] = items
        self.n = need

    @property
    def view(self) -> np.ndarray:
        return self.a[: self.n]


def _gather(starts: np.ndarray, lengths: np.ndarray, store: np.ndarray) -> np.ndarray:
    """``concatenate([store[s:s + n] for s, n in zip(starts, lengths)])`` without the loop."""
    nonzero = lengths > 0
    starts, lengths = starts[nonzero].astype(np.int64), lengths[nonzero].astype(np.int64)
    if len(lengths) == 0:
        return store[:0].copy()
    # Index steps: +1 inside a range, a jump to the next range's start at its first item.
    ends = np.cumsum(lengths)
    small = len(store) < 2**31 and ends[-1] < 2**31  # int32 steps: half the memory traffic
    step = np.ones(int(ends[-1]), dtype=np.int32 if small else np.int64)
    step[0] = starts[0]
    step[ends[:-1]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return store[np.cumsum(step, out=step)]


def _sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per range ``offsets[i]:offsets[i + 1]`` (none empty), the int64 sum of ``values``."""
    if len(offsets) < 2:
        return np.zeros(0, dtype=np.int64)
    return np.add.reduceat(values, offsets[:-1], dtype=np.int64)


class ChunkSegments:
    """The segments of a list of documents: ``sid`` (all documents' segment ids, in order) and
    ``offsets`` (document i is ``sid[offsets[i]:offsets[i + 1]]``; every document has one)."""

    def __init__(self, table: SegmentTable, sid: np.ndarray, offsets: np.ndarray) -> None:
        self.sid, self.offsets = sid, offsets
        self.n_docs = len(offsets) - 1
        # The table's arrays as of now (a later chunk may grow or reset the table).
        self._cols = [c.view for c in table.cols]
        self._tok, self._word_store, self._word_len = table.tok.view, table.words.view, table.word_len.view
        self._word_hash, self._word_list = table.word_hash.view, table.word_list
        self._word_bytes = (table.word_bytes.view, table.word_bstart.view, table.word_blen.view)
        self._col: dict[int, np.ndarray] = {}
        self._sum: dict[int, np.ndarray] = {}
        self._words: np.ndarray | None = None

    def col(self, c: int) -> np.ndarray:
        """Feature ``c`` of every segment, in order."""
        if c not in self._col:
            self._col[c] = self._cols[c][self.sid]
        return self._col[c]

    def sums(self, c: int) -> np.ndarray:
        """Per document, the sum of feature ``c`` over its segments."""
        if c not in self._sum:
            self._sum[c] = _sums(self.col(c), self.offsets)
        return self._sum[c]

    def stop_words(self) -> np.ndarray:
        """Per document: how many distinct stop words its dedup words hold."""
        if not self.n_docs:
            return np.zeros(0, dtype=np.int64)
        masks = np.bitwise_or.reduceat(self.col(STOP), self.offsets[:-1])
        bits = np.zeros(self.n_docs, dtype=np.int64)
        for b in _STOP_BITS.values():
            bits += (masks & b) != 0
        return bits

    def _select(self, docs: np.ndarray, items: np.ndarray, per_doc: np.ndarray) -> np.ndarray:
        """The part of ``items`` (``per_doc[i]`` of them for document i, in order) of ``docs``."""
        if len(docs) == self.n_docs:
            return items
        take = np.zeros(self.n_docs, dtype=bool)
        take[docs] = True
        return items[np.repeat(take, per_doc)]

    def tokens(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 ids of documents ``docs`` (ascending) concatenated, ids per document)."""
        per_doc = np.diff(self.offsets)
        starts = self._select(docs, self.col(TOK_START), per_doc)
        lengths = self._select(docs, self.col(TOK_LEN), per_doc)
        return _gather(starts, lengths, self._tok), self.sums(TOK_LEN)[docs]

    def word_table(self, docs: np.ndarray) -> WordTable:
        """The dedup words of documents ``docs`` (ascending) as a :class:`WordTable`."""
        if self._words is None:
            self._words = _gather(self.col(WORD_START), self.col(WORD_LEN), self._word_store)
        ids = self._select(docs, self._words, self.sums(WORD_LEN))
        return WordTable.from_arrays(ids, self._word_len[ids], self.sums(WORD_LEN)[docs], self._word_hash)

    def exact_hashes(self, table: WordTable) -> np.ndarray:
        """:func:`.dedup.exact_hashes` of the documents of ``table`` (a :meth:`word_table`): the
        same blake2b of the dedup words joined by spaces, from a byte store of the words."""
        store, bstart, blen = self._word_bytes
        lengths = blen[table.ids]  # utf-8 bytes + 1 (a space after each word)
        data = memoryview(_gather(bstart[table.ids], lengths, store))
        ends = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=ends[1:])
        bounds = ends[table.offsets].tolist()
        raw = b"".join(hashlib.blake2b(data[a: b - 1] if b > a else b"", digest_size=16).digest()
                       for a, b in zip(bounds, bounds[1:]))
        return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2).copy()


class _Parts:
    """The parts of all documents as one sequence, without building it: item k."""

    def __init__(self, per_doc: list[list[str]], offsets: np.ndarray) -> None:
        self.per_doc, self.offsets = per_doc, offsets

    def __getitem__(self, k: int) -> str:
        d = int(np.searchsorted(self.offsets, k, side="right")) - 1
        return self.per_doc[d][k - int(self.offsets[d])]


class SegmentTable:
    """Per-process cache from text segments to their tokens, dedup words and counts."""

    def __init__(self, encoder: DocEncoder) -> None:
        self.encoder = encoder
        self.reset()

    def reset(self) -> None:
        self._spaced: dict[str, int] = {}  # part after a space -> id of its segment, or _MERGE
        self._exact: dict[str, int] = {}  # any segment text -> id
        self._word_ids: dict[str, int] = {}
        self.word_list: list[str] = []
        self.cols = [_Grow(np.int64) for _ in range(_N_COLS)]  # feature c of segment i: cols[c].a[i]
        self.tok = _Grow(np.uint32)
        self.words = _Grow(np.int64)
        self.word_len = _Grow(np.int64)
        self.word_hash = _Grow(np.uint64)
        self.word_bytes = _Grow(np.uint8)  # each word's utf-8 and a space
        self.word_bstart = _Grow(np.int64)
        self.word_blen = _Grow(np.int64)
        self._pending: list[str] = []  # segments with an id but no features yet
        self._flags = bytearray()  # per segment: _STARTS_NEWLINE | _ENDS_WHITESPACE
        self.n_segments = 0

    # -- ids ----------------------------------------------------------------------------------

    def _new(self, seg: str) -> int:
        self._pending.append(seg)
        self._flags.append((_STARTS_NEWLINE if seg[:1] == "\n" else 0)
                           | (_ENDS_WHITESPACE if not seg or seg[-1] in ENGINE_WHITESPACE else 0))
        self.n_segments += 1
        return self.n_segments - 1

    def _exact_id(self, seg: str) -> int:
        i = self._exact.get(seg)
        if i is None:
            i = self._exact[seg] = self._new(seg)
        return i

    def _spaced_id(self, part: str) -> int:
        """The id of the segment that ``part`` stands for after a space (see :meth:`segment`)."""
        i = self._spaced.get(part)
        if i is None:
            if part[:1] == "\n":
                i = self._exact_id(part)
            elif _starts_ok(part):
                i = self._exact_id(" " + part)
            else:
                i = _MERGE
            self._spaced[part] = i
        return i

    # -- documents ----------------------------------------------------------------------------

    def segment(self, docs: list[str]) -> ChunkSegments:
        """The segments of ``docs``: one dict lookup per space-separated part, the rest in numpy."""
        if self.n_segments > _MAX_SEGMENTS or max(self.tok.n, self.words.n, self.word_bytes.n) > _MAX_STORE:
            self.reset()
        # A space before each newline: a part that starts with "\n" is a newline and the first
        # word of the next line (the segment is the part itself), any other part but the first of
        # a document stands for " " + part. No part holds "\n" anywhere but at its start.
        per_doc = [d.replace("\n", " \n").split(" ") if "\n" in d else d.split(" ") for d in docs]
        ids = np.concatenate([self._part_ids(p) for p in per_doc] or [np.zeros(0, dtype=np.int64)])
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, per_doc), dtype=np.int64, count=len(docs)), out=offsets[1:])
        ids[offsets[:-1]] = [self._exact_id(p[0]) for p in per_doc]
        parts = _Parts(per_doc, offsets)
        flags = np.frombuffer(bytes(self._flags), dtype=np.uint8)
        known = ids >= 0
        # A newline is cut before when the text before it ends with non-whitespace; otherwise it
        # ends a longer run of whitespace, and it joins the segment before.
        nl = np.flatnonzero(known & (flags[np.where(known, ids, 0)] & _STARTS_NEWLINE).astype(bool))
        if len(nl):
            prev = ids[nl - 1]
            ws_before = flags[np.maximum(prev, 0)] & _ENDS_WHITESPACE != 0
            for j in np.flatnonzero(prev < 0).tolist():  # after " " + part that joins the one before
                part = parts[int(nl[j]) - 1]
                ws_before[j] = not part or part[-1] in ENGINE_WHITESPACE
            ids[nl[ws_before]] = _MERGE
        if len(ids) and ids.min() < 0:
            ids, offsets = self._merge(parts, ids, offsets)
        self._analyse_pending()
        return ChunkSegments(self, ids, offsets)

    def _part_ids(self, parts: list[str]) -> np.ndarray:
        """``_spaced`` ids of ``parts`` (the first one's is a placeholder: it starts a document)."""
        ids = np.fromiter(map(self._spaced.get, parts, _NO_ID), dtype=np.int64, count=len(parts))
        ids[0] = 0
        miss = np.flatnonzero(ids == _MISSING)
        if len(miss):
            ids[miss] = [self._spaced_id(parts[k]) for k in miss.tolist()]
        return ids

    def _merge(self, parts: _Parts, ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Merge the segments around cuts that are no pre-token boundary (items marked ``_MERGE``;
        a document's first item never is, so merges stay inside documents)."""
        first = set(offsets[:-1].tolist())

        def text(k: int) -> str:
            part = parts[k]
            return part if k in first or part.startswith("\n") else " " + part

        # A run of bad cuts before items j..k makes items j-1..k one segment.
        bad = np.flatnonzero(ids == _MERGE)
        keep = np.ones(len(ids), dtype=bool)
        keep[bad] = False
        run_start = np.ones(len(bad), dtype=bool)
        run_start[1:] = np.diff(bad) > 1
        run_end = np.ones(len(bad), dtype=bool)
        run_end[:-1] = run_start[1:]
        for j, k in zip(bad[run_start].tolist(), bad[run_end].tolist()):
            ids[j - 1] = self._exact_id("".join(map(text, range(j - 1, k + 1))))
        kept_before = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept_before[1:])
        return ids[keep], kept_before[offsets]

    # -- features -----------------------------------------------------------------------------

    def _analyse_pending(self) -> None:
        """Features, tokens and dedup words of the segments that got an id since the last call."""
        segs = self._pending
        m = len(segs)
        if m == 0:
            return
        rows = np.zeros((m, _N_COLS), dtype=np.int64)
        if self.encoder.fast:
            tok, rows[:, TOK_LEN] = self.encoder.encode_many(segs)
        else:
            tok = np.zeros(0, dtype=np.uint32)
        rows[:, TOK_START] = self.tok.n + np.cumsum(rows[:, TOK_LEN]) - rows[:, TOK_LEN]

        per_seg = list(map(dedup_words, segs))
        words = list(itertools.chain.from_iterable(per_seg))
        wids = np.fromiter(map(self._word_ids.get, words, _NO_ID), dtype=np.int64, count=len(words))
        new_words = np.flatnonzero(wids < 0).tolist()
        if new_words:
            added = []
            for i in new_words:
                w = words[i]
                j = self._word_ids.get(w)
                if j is None:
                    j = self._word_ids[w] = len(self.word_list)
                    self.word_list.append(w)
                    added.append(w)
                wids[i] = j
            self.word_len.extend(np.fromiter(map(len, added), dtype=np.int64, count=len(added)))
            encoded = b" ".join(w.encode("utf-8") for w in added) + b" "
            blen = np.fromiter((len(w.encode("utf-8")) + 1 for w in added), dtype=np.int64, count=len(added))
            self.word_bstart.extend(self.word_bytes.n + np.cumsum(blen) - blen)
            self.word_blen.extend(blen)
            self.word_bytes.extend(np.frombuffer(encoded, dtype=np.uint8))
            self.word_hash.extend(np.fromiter(map(stable_hash64, added), dtype=np.uint64, count=len(added)))
        rows[:, WORD_LEN] = np.fromiter(map(len, per_seg), dtype=np.int64, count=m)
        word_ends = np.cumsum(rows[:, WORD_LEN])
        rows[:, WORD_START] = self.words.n + word_ends - rows[:, WORD_LEN]
        stop = np.fromiter(map(_STOP_BITS.get, words, itertools.repeat(0)), dtype=np.int64, count=len(words))
        if stop.any():
            has = rows[:, WORD_LEN] > 0
            rows[has, STOP] = np.bitwise_or.reduceat(stop, rows[has, WORD_START] - self.words.n)

        raw = list(map(str.split, segs))
        rows[:, RAW_WORDS] = np.fromiter(map(len, raw), dtype=np.int64, count=m)
        raw_len = np.zeros(int(rows[:, RAW_WORDS].sum()) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, itertools.chain.from_iterable(raw)), dtype=np.int64, count=len(raw_len) - 1),
                  out=raw_len[1:])
        raw_ends = np.cumsum(rows[:, RAW_WORDS])
        rows[:, RAW_CHARS] = raw_len[raw_ends] - raw_len[raw_ends - rows[:, RAW_WORDS]]
        rows[:, NON_ALPHA] = np.fromiter(map(len, map(_NON_ALPHA_WORD.findall, segs)), dtype=np.int64, count=m)
        rows[:, HASHES] = np.fromiter(map(str.count, segs, itertools.repeat("#")), dtype=np.int64, count=m)
        rows[:, ELLIPSES] = (np.fromiter(map(str.count, segs, itertools.repeat("...")), dtype=np.int64, count=m)
                             + np.fromiter(map(str.count, segs, itertools.repeat("…")), dtype=np.int64, count=m))

        for c in range(_N_COLS):
            self.cols[c].extend(rows[:, c])
        self.tok.extend(tok)
        self.words.extend(wids)
        segs.clear()
