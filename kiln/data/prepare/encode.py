"""Tokenizing documents fast, and fill-in-the-middle (FIM) at the document level.

Fast path: for the byte-level BPE kiln trains (no normalizer, GPT-2 pre-tokenizer regex), a
document's ids are the concatenation of the ids of its pre-tokens, so each distinct pre-token
is encoded once and cached, and identical ids come out. The worker goes one step further and
caches whole text segments (:mod:`.segments`; ~10× ``Tokenizer.encode_batch`` on one core,
which builds offsets and masks per token); :meth:`DocEncoder.encode_many` encodes the segments
it has not seen. Any other tokenizer, and any document containing a special token's text, goes
through ``tokenizers`` itself.

FIM (Bavarian et al. 2022, as in StarCoder): a document is cut at two uniform character
positions into prefix/middle/suffix and re-ordered around sentinel tokens:
PSM ``<|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle``,
SPM ``<|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle``; EOS follows as usual.
"""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import regex

from kiln.errors import KilnDataError

log = logging.getLogger(__name__)

FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)

# The pre-tokenizer of tokenizers' ByteLevel(use_regex=True): GPT-2's pattern.
_GPT2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_CACHE_LIMIT = 1 << 20


class DocEncoder:
    """Documents → token ids (numpy), with an optional FIM transform."""

    def __init__(self, tokenizer_path: str) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(tokenizer_path)
        spec = json.loads(self._tok.to_str())
        pre = spec.get("pre_tokenizer") or {}
        self.fast = (spec.get("normalizer") is None and (spec.get("model") or {}).get("type") == "BPE"
                     and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                     and not pre.get("add_prefix_space", False))
        self._specials = [t["content"] for t in spec.get("added_tokens", [])]
        self._cache: dict[str, list[int]] = {}
        self.fim_ids = [self._tok.token_to_id(t) for t in FIM_TOKENS]

    def check_fim(self, path: str) -> None:
        missing = [t for t, i in zip(FIM_TOKENS, self.fim_ids) if i is None]
        if missing:
            raise KilnDataError(
                f"fim.rate > 0 but tokenizer {path} lacks the FIM sentinel token(s) {', '.join(missing)}; "
                f"train a tokenizer with them (`kiln data train-tokenizer` adds them by default) or set fim.rate=0")

    def has_special(self, text: str) -> bool:
        """Whether ``text`` holds a special token's text (then only ``tokenizers`` encodes it right)."""
        return any(s in text for s in self._specials)

    def encode_many(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 ids of ``texts`` concatenated, ids per text) by the fast path: for ``self.fast``
        tokenizers and texts without special tokens; one pre-tokenizer call per text, and the
        ``tokenizers`` model only for pre-tokens not seen before."""
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        per_text = list(map(_GPT2.findall, texts))
        pieces = list(itertools.chain.from_iterable(per_text))
        ids = list(map(cache.get, pieces))
        if None in ids:
            for i in [i for i, v in enumerate(ids) if v is None]:
                v = cache.get(pieces[i])
                if v is None:
                    v = cache[pieces[i]] = self._tok.encode(pieces[i], add_special_tokens=False).ids
                ids[i] = v
        per_piece = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(per_piece.sum()))
        cs = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(per_piece, out=cs[1:])
        ends = np.cumsum(np.fromiter(map(len, per_text), dtype=np.int64, count=len(texts)))
        return flat, np.diff(cs[ends], prepend=0)

    def _encode_fast(self, text: str) -> list[int]:
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        out: list[int] = []
        extend = out.extend
        for piece in _GPT2.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = cache[piece] = self._tok.encode(piece, add_special_tokens=False).ids
            extend(ids)
        return out

    def encode(self, text: str) -> list[int]:
        if self.fast and not self.has_special(text):
            return self._encode_fast(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_fim(self, text: str, rng: np.random.Generator, spm_rate: float) -> list[int]:
        lo, hi = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
        prefix, middle, suffix = text[:lo], text[lo:hi], text[hi:]
        pre_id, mid_id, suf_id = self.fim_ids
        if rng.random() < spm_rate:
            return [pre_id, suf_id, *self.encode(suffix), mid_id, *self.encode(prefix), *self.encode(middle)]
        return [pre_id, *self.encode(prefix), suf_id, *self.encode(suffix), mid_id, *self.encode(middle)]
