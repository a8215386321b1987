"""Byte-level BPE tokenizers: training one locally, loading one from a file.

kiln never downloads a tokenizer: a run names a local ``tokenizer.json`` (or uses the bundled
one), so a cluster without network access behaves exactly like a laptop.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from kiln.errors import KilnDataError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"

_ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_TOKENIZER = _ASSETS / "tokenizer.json"
BUNDLED_CORPUS = _ASSETS / "corpus.txt.gz"


def bundled_tokenizer_path() -> str:
    """Path of the byte-level BPE (vocab 4096) shipped with kiln."""
    return str(BUNDLED_TOKENIZER)


def bundled_corpus_path() -> str:
    """Path of the gzip-compressed public-domain corpus shipped with kiln (see assets/README.md)."""
    return str(BUNDLED_CORPUS)


def open_text(path: str):
    """Open a UTF-8 text file, transparently un-gzipping ``*.gz``."""
    if not os.path.isfile(path):
        raise KilnDataError(f"text file not found: {path}")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_lines(text_files: list[str]) -> Iterator[str]:
    for path in text_files:
        with open_text(path) as f:
            yield from f


def train_bpe_tokenizer(text_files: list[str], vocab_size: int, out_dir: str) -> str:
    """Train a byte-level BPE on ``text_files`` (``.txt`` or ``.txt.gz``); return the tokenizer.json path.

    ``<|endoftext|>`` is the only special token (id 0); it serves as EOS and as padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not text_files:
        raise KilnDataError("train_bpe_tokenizer: no text files given")
    # 256 byte symbols + the special token must fit, or the trainer silently grows the vocab.
    if vocab_size < 257:
        raise KilnDataError(f"vocab_size ({vocab_size}) must be at least 257 (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_lines(text_files), trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "tokenizer.json")
    tmp = out + f".tmp.{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out)
    log.info("trained byte-level BPE (vocab %d) on %d file(s) -> %s", tok.get_vocab_size(), len(text_files), out)
    return out


class KilnTokenizer:
    """Thin wrapper over a Hugging Face ``tokenizers.Tokenizer`` loaded from a local file."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise KilnDataError(
                f"tokenizer file not found: {path} (kiln loads tokenizers only from local files; "
                f"train one with `kiln data train-tokenizer` or use the bundled {bundled_tokenizer_path()})"
            )
        self.path = path
        self._tok = Tokenizer.from_file(path)
        eos = self._tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise KilnDataError(f"tokenizer {path} has no {EOS_TOKEN!r} token, which kiln uses as EOS")
        self.eos_id: int = eos
        self.pad_id: int = eos
        self.vocab_size: int = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"KilnTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(path: str) -> KilnTokenizer:
    """Load a tokenizer.json from a local path (never from a hub)."""
    return KilnTokenizer(path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
