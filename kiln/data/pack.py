"""Tokenize text, pack it into fixed-length samples and write them as MDS shards.

A dataset directory holds streaming's ``index.json`` and shards plus ``kiln_meta.json``
(seq_len, vocab size, EOS id, tokenizer hash). Every directory is written beside its final
place and renamed into it when complete, so a directory at the final path is always whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from kiln.data.tokenizer import file_sha256, load_tokenizer, open_text
from kiln.errors import KilnDataError

log = logging.getLogger(__name__)

META_FILE = "kiln_meta.json"
INDEX_FILE = "index.json"
TMP_MARK = ".kiln-tmp-"
FORMAT = "kiln-mds-v1"


@dataclass(frozen=True)
class PackStats:
    documents: int
    tokens: int  # including one EOS per document
    samples: int
    dropped_tokens: int  # tail shorter than one sample, not written


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def iter_documents(text_files: list[str]) -> Iterator[str]:
    """Yield documents: blocks of text separated by one or more blank lines.

    Blank lines are the one boundary every plain-text source has. The bundled corpus is laid out
    one chapter per block, so its documents are chapters (~1k tokens): long enough to teach
    context, short enough that a sample sees several EOS boundaries at small seq_len.
    """
    for path in text_files:
        with open_text(path) as f:
            yield from iter_blank_line_blocks(f)


def iter_blank_line_blocks(lines: Iterable[str]) -> Iterator[str]:
    """Blank-line separated blocks of ``lines``, each without trailing newlines."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


class SamplePacker:
    """Cuts a token stream into samples of ``seq_len + 1`` tokens overlapping by one token.

    Token i+1 of a sample is the label of token i, so the last token of one sample is the
    first input of the next and no token boundary goes untrained.
    """

    def __init__(self, seq_len: int, dtype: np.dtype) -> None:
        self.seq_len, self.dtype = seq_len, dtype
        self.buffer = np.zeros(0, dtype=np.int64)
        self.tokens_in = 0

    def feed(self, tokens: np.ndarray) -> Iterator[np.ndarray]:
        self.tokens_in += len(tokens)
        buf = np.concatenate([self.buffer, tokens])
        sample_len = self.seq_len + 1
        n = (len(buf) - 1) // self.seq_len if len(buf) >= sample_len else 0
        for i in range(n):
            yield buf[i * self.seq_len: i * self.seq_len + sample_len].astype(self.dtype)
        self.buffer = buf[n * self.seq_len:]

    @property
    def dropped_tokens(self) -> int:
        """Tokens in no sample: the tail shorter than a sample (the overlap token is not dropped)."""
        if self.tokens_in >= self.seq_len + 1:
            return max(len(self.buffer) - 1, 0)
        return len(self.buffer)


def is_complete_dataset(path: str) -> bool:
    """True when ``path`` is a finished dataset (written by the atomic rename)."""
    return os.path.isfile(os.path.join(path, INDEX_FILE)) and os.path.isfile(os.path.join(path, META_FILE))


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise KilnDataError(f"{path} is not a kiln dataset: {META_FILE} is missing (prepare it with `kiln data prepare`)")
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f)


def _decompress_shards(path: str) -> None:
    """Put each shard's raw form beside its zstd form, as streaming would on first read.

    Streaming decompresses a local shard in place on first use under a lock that is private to
    one job, through a fixed ``<shard>.tmp`` name; two jobs (or test runs) reading one directory
    at once could race there. A directory written complete never needs that step.
    """
    from streaming.base.compression import decompress

    with open(os.path.join(path, INDEX_FILE), encoding="utf-8") as f:
        index = json.load(f)
    for shard in index["shards"]:
        if not shard.get("compression") or not shard.get("zip_data"):
            continue
        with open(os.path.join(path, shard["zip_data"]["basename"]), "rb") as f:
            raw = decompress(shard["compression"], f.read())
        with open(os.path.join(path, shard["raw_data"]["basename"]), "wb") as f:
            f.write(raw)


def write_samples_to_mds(
    samples: Iterable[np.ndarray],
    out_dir: str,
    *,
    sample_len: int,
    vocab_size: int,
    meta: dict | Callable[[], dict] | None = None,
    size_limit: int = 1 << 26,
    overwrite: bool = False,
    decompress_shards: bool = True,
) -> int:
    """Write 1-D token arrays of length ``sample_len`` to ``out_dir`` atomically; return the count.

    The final directory appears only after the last shard and the meta file are on disk.
    ``meta`` may be a callable, evaluated after the last sample (for counts known only then).
    ``decompress_shards`` also leaves the raw shard beside each zstd one (see ``_decompress_shards``).
    """
    from streaming import MDSWriter

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise KilnDataError(f"dataset directory already exists: {out_dir} (pass overwrite to replace it)")
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    # Same parent directory so the final os.rename stays on one filesystem (atomic).
    tmp = tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}", dir=parent)
    dtype = token_dtype(vocab_size)
    count = 0
    try:
        columns = {"tokens": f"ndarray:{dtype.name}:{sample_len}"}
        os.rmdir(tmp)  # MDSWriter wants to create it; the unique name stays reserved by convention
        with MDSWriter(out=tmp, columns=columns, compression="zstd", size_limit=size_limit) as w:
            for sample in samples:
                if sample.shape != (sample_len,):
                    raise KilnDataError(f"sample {count} has shape {sample.shape}, expected ({sample_len},)")
                w.write({"tokens": np.ascontiguousarray(sample, dtype=dtype)})
                count += 1
        if count == 0:
            raise KilnDataError(f"no samples to write to {out_dir}: the text is shorter than one sample ({sample_len} tokens)")
        if decompress_shards:
            _decompress_shards(tmp)
        full_meta = {"format": FORMAT, "sample_len": sample_len, "seq_len": sample_len - 1, "dtype": dtype.name,
                     "vocab_size": vocab_size, "samples": count,
                     **((meta() if callable(meta) else meta) or {})}
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(out_dir):  # overwrite: move the old one aside first, then swap
            old = tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "d"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def pack_text_to_mds(
    text_files: list[str],
    tokenizer_path: str,
    seq_len: int,
    out_dir: str,
    *,
    size_limit: int = 1 << 26,
    overwrite: bool = False,
) -> PackStats:
    """Tokenize documents, append EOS to each, concatenate and cut into samples of ``seq_len + 1``.

    Consecutive samples overlap by one token (stride ``seq_len``): the last token of sample i
    is the first of sample i+1, so every next-token transition of the stream is a label exactly
    once (inputs ``[:-1]``, labels ``[1:]``). The tail shorter than a full sample is dropped.
    """
    if seq_len < 1:
        raise KilnDataError(f"seq_len must be >= 1, got {seq_len}")
    tok = load_tokenizer(tokenizer_path)
    sample_len = seq_len + 1
    dtype = token_dtype(tok.vocab_size)
    counts = {"documents": 0, "tokens": 0, "dropped": 0}

    def docs_in_batches(n: int = 512) -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in iter_documents(text_files):
            batch.append(doc)
            if len(batch) == n:
                yield batch
                batch = []
        if batch:
            yield batch

    def samples() -> Iterator[np.ndarray]:
        packer = SamplePacker(seq_len, dtype)
        for batch in docs_in_batches():
            # tokenizers parallelises the batch in Rust. A literal "<|endoftext|>" in the text
            # also becomes EOS, as in GPT-2 style pipelines; the bundled corpus has none.
            ids = tok.encode_batch(batch)
            counts["documents"] += len(ids)
            flat = np.fromiter((t for doc in ids for t in (*doc, tok.eos_id)), dtype=np.int64)
            counts["tokens"] += len(flat)
            yield from packer.feed(flat)
        counts["dropped"] = packer.dropped_tokens

    meta = {
        "eos_id": tok.eos_id,
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "sources": [os.path.basename(p) for p in text_files],
        "sample_overlap": 1,
    }

    n = write_samples_to_mds(samples(), out_dir, sample_len=sample_len, vocab_size=tok.vocab_size,
                             meta=lambda: {**meta, "documents": counts["documents"], "tokens": counts["tokens"]},
                             size_limit=size_limit, overwrite=overwrite)
    stats = PackStats(documents=counts["documents"], tokens=counts["tokens"], samples=n,
                      dropped_tokens=counts["dropped"])
    log.info("packed %s -> %s: %s", text_files, out_dir, asdict(stats))
    return stats
