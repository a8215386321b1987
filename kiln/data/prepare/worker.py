"""One chunk in a worker process: read, normalise, scrub, filter, hash, tokenize; write one file.

The result file (``chunk-NNNNNN.npz``) holds the kept documents' tokens and dedup features plus
the chunk's counts; it appears by ``os.replace`` only when complete, so a killed run leaves
either a whole result or none, and a re-run redoes exactly the missing chunks.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import signal
import time
from collections import Counter

import numpy as np

from kiln.data.prepare.config import PrepareConfig, prepare_config_from_dict
from kiln.data.prepare.dedup import exact_hashes, minhash_signatures
from kiln.data.prepare.encode import DocEncoder
from kiln.data.prepare.inputs import Chunk, read_chunk
from kiln.data.prepare.pii import scrub
from kiln.data.prepare.quality import quality_reasons
from kiln.data.prepare.text import WordTable, dedup_words, normalize_unicode

_STATE: dict = {}


def result_path(chunks_dir: str, index: int) -> str:
    return os.path.join(chunks_dir, f"chunk-{index:06d}.npz")


def init_worker(cfg: dict, tokenizer_path: str, chunks_dir: str, in_subprocess: bool = True) -> None:
    if in_subprocess:
        # Die with the parent: a killed `kiln data prepare` must not leave workers writing on.
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    config = prepare_config_from_dict(cfg)
    encoder = DocEncoder(tokenizer_path)
    if config.fim.rate > 0:
        encoder.check_fim(tokenizer_path)
    _STATE.update(cfg=config, encoder=encoder, chunks_dir=chunks_dir)


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
    words = [dedup_words(t) for t in texts]
    reasons = quality_reasons(texts, words, cfg.quality)
    dropped.update(r for r in reasons if r is not None)
    kept = [i for i, r in enumerate(reasons) if r is None]
    texts = [texts[i] for i in kept]
    words = [words[i] for i in kept]

    arrays: dict[str, np.ndarray] = {}
    if cfg.dedup.mode != "none":
        arrays["exact"] = exact_hashes(words)
    if cfg.dedup.mode == "near":
        arrays["minhash"] = minhash_signatures(WordTable(words), cfg.dedup)

    # FIM choices come from (seed, chunk index): the same whatever worker runs the chunk, or when.
    rng = np.random.default_rng([cfg.seed, chunk.index])
    fim = Counter()
    ids: list[list[int]] = []
    for text in texts:
        if cfg.fim.rate > 0 and rng.random() < cfg.fim.rate:
            spm = rng.random() < cfg.fim.spm_rate
            ids.append(encoder.encode_fim(text, rng, 1.0 if spm else 0.0))
            fim["spm" if spm else "psm"] += 1
        else:
            ids.append(encoder.encode(text))
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    arrays["tokens"] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    arrays["doc_tokens"] = lengths
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
