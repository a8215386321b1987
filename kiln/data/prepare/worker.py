"""One chunk in a worker process: read, normalise, scrub, filter, hash, tokenize; write one file.

Tokens, Gopher word counts, dedup words and exact hashes all come from the worker's
:class:`~kiln.data.prepare.segments.SegmentTable` (one dict lookup per space-separated part of
the text, then numpy over the chunk); they equal what the per-document functions give.

The result file (``chunk-NNNNNN.npz``) holds the kept documents' tokens and dedup features plus
the chunk's counts; it appears by ``os.replace`` only when complete, so a killed run leaves
either a whole result or none, and a re-run redoes exactly the missing chunks.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from collections import Counter

import numpy as np

from kiln.data.prepare.config import PrepareConfig, prepare_config_from_dict
from kiln.data.prepare.dedup import minhash_signatures
from kiln.data.prepare.encode import DocEncoder
from kiln.data.prepare.inputs import Chunk, read_chunk
from kiln.data.prepare.pii import scrub
from kiln.data.prepare.quality import quality_reasons_from_counts
from kiln.data.prepare.segments import (ELLIPSES, HASHES, NON_ALPHA, RAW_CHARS, RAW_WORDS, ChunkSegments,
                                        SegmentTable)
from kiln.data.prepare.text import normalize_unicode

_STATE: dict = {}


def result_path(chunks_dir: str, index: int) -> str:
    return os.path.join(chunks_dir, f"chunk-{index:06d}.npz")


def _keep_freed_memory() -> None:
    """Let glibc keep the large arrays a chunk frees for the next chunk, instead of handing them
    back to the kernel and faulting fresh zeroed pages in again (~15% of a chunk's time)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: heap, not mmap, up to 32 MiB (glibc's maximum)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 64 << 20)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass


def init_worker(cfg: dict, tokenizer_path: str, chunks_dir: str, in_subprocess: bool = True) -> None:
    if in_subprocess:
        # Die with the parent: a killed `kiln data prepare` must not leave workers writing on.
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        _keep_freed_memory()
    config = prepare_config_from_dict(cfg)
    encoder = DocEncoder(tokenizer_path)
    if config.fim.rate > 0:
        encoder.check_fim(tokenizer_path)
    segments = SegmentTable(encoder)
    _STATE.update(cfg=config, encoder=encoder, segments=segments, chunks_dir=chunks_dir)


def _tokens(cfg: PrepareConfig, encoder: DocEncoder, segs: ChunkSegments, kept: np.ndarray, texts: list[str],
            chunk_index: int) -> tuple[np.ndarray, np.ndarray, Counter]:
    """(all kept documents' token ids, ids per document, FIM documents by kind)."""
    fim: Counter = Counter()
    if encoder.fast:
        flat, lengths = segs.tokens(kept)
        special = {j for j, t in enumerate(texts) if encoder.has_special(t)}
        if cfg.fim.rate == 0 and not special:
            return flat, lengths, fim
        parts = np.split(flat, np.cumsum(lengths)[:-1]) if len(texts) else []
    else:
        special, parts = set(), [None] * len(texts)
    # FIM choices come from (seed, chunk index): the same whatever worker runs the chunk, or when.
    rng = np.random.default_rng([cfg.seed, chunk_index])
    ids: list[np.ndarray] = []
    for j, text in enumerate(texts):
        if cfg.fim.rate > 0 and rng.random() < cfg.fim.rate:
            spm = rng.random() < cfg.fim.spm_rate
            ids.append(np.array(encoder.encode_fim(text, rng, 1.0 if spm else 0.0), dtype=np.uint32))
            fim["spm" if spm else "psm"] += 1
        elif parts[j] is None or j in special:
            ids.append(np.array(encoder.encode(text), dtype=np.uint32))
        else:
            ids.append(parts[j])
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32)
    return flat.astype(np.uint32, copy=False), lengths, fim


def process_chunk(chunk: Chunk) -> tuple[int, dict]:
    cfg: PrepareConfig = _STATE["cfg"]
    encoder: DocEncoder = _STATE["encoder"]
    t0 = time.perf_counter()
    raw = read_chunk(chunk, cfg.input)
    dropped: Counter = Counter()
    pii: Counter = Counter()
    bytes_in = 0
    texts: list[str] = []
    for doc in raw:
        bytes_in += len(doc.encode("utf-8"))
        doc = normalize_unicode(doc, cfg.normalize.unicode)
        if not doc.strip():
            dropped["empty"] += 1
            continue
        texts.append(scrub(doc, cfg.pii, pii))

    # Every per-word quantity below comes from the segment table (see .segments).
    segs = _STATE["segments"].segment(texts)
    if cfg.quality.enabled:
        reasons = quality_reasons_from_counts(
            texts, *(segs.sums(col).tolist() for col in (RAW_WORDS, RAW_CHARS, HASHES, ELLIPSES, NON_ALPHA)),
            segs.stop_words().tolist(), lambda alive: segs.word_table(np.asarray(alive, dtype=np.int64)),
            cfg.quality)
    else:
        reasons = [None] * len(texts)
    dropped.update(r for r in reasons if r is not None)
    kept = np.array([i for i, r in enumerate(reasons) if r is None], dtype=np.int64)
    texts = [texts[i] for i in kept.tolist()]

    arrays: dict[str, np.ndarray] = {}
    if cfg.dedup.mode != "none":
        words = segs.word_table(kept)
        arrays["exact"] = segs.exact_hashes(words)
        if cfg.dedup.mode == "near":
            arrays["minhash"] = minhash_signatures(words, cfg.dedup)

    arrays["tokens"], arrays["doc_tokens"], fim = _tokens(cfg, encoder, segs, kept, texts, chunk.index)
    arrays["doc_bytes"] = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    stats = {"documents_in": len(raw), "documents_kept": len(texts), "bytes_in": bytes_in, "input_bytes": chunk.nbytes,
             "dropped": dict(dropped), "pii": {k: v for k, v in pii.items() if v}, "fim": dict(fim), "seconds": time.perf_counter() - t0}
    arrays["stats"] = np.array(json.dumps(stats))

    final = result_path(_STATE["chunks_dir"], chunk.index)
    tmp = f"{final}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return chunk.index, stats


def load_result(chunks_dir: str, index: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    with np.load(result_path(chunks_dir, index)) as z:
        return {k: z[k] for k in keys if k in z.files}


def load_stats(chunks_dir: str, index: int) -> dict:
    with np.load(result_path(chunks_dir, index)) as z:
        return json.loads(str(z["stats"]))
