"""`kiln data prepare`: chunks → workers → one global dedup decision → packed MDS shards.

Everything between the inputs and ``--out`` lives in a work directory beside it,
``.<name>.kiln-prepare/``, and every step there is atomic:

1. ``plan.json``: the chunk list and a fingerprint of what decides the output (input files with
   size and mtime, tokenizer hash, config); a work dir with another fingerprint is discarded.
2. ``chunks/chunk-NNNNNN.npz``: one per chunk, written by a worker (see :mod:`.worker`).
3. ``keep.npy``: the dedup decision over all documents in order.
4. ``dataset/``: the MDS shards (:func:`write_samples_to_mds`), then ``stats.json``; then one
   rename to ``--out``. A killed run re-run with the same arguments redoes only what is missing,
   and the result equals an uninterrupted run's (only timings differ).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np

from kiln.data.pack import TMP_MARK, SamplePacker, is_complete_dataset, token_dtype, write_samples_to_mds
from kiln.data.prepare.config import PrepareConfig
from kiln.data.prepare.dedup import decide_exact, decide_near
from kiln.data.prepare.inputs import Chunk, expand_inputs, plan_chunks
from kiln.data.prepare.progress import PrepareProgress, progress_mode
from kiln.data.prepare.worker import init_worker, load_result, load_stats, process_chunk, result_path
from kiln.data.tokenizer import file_sha256, load_tokenizer
from kiln.errors import KilnDataError

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
PIPELINE_VERSION = 1  # bump when the same inputs and config would give other output


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint(paths: list[str], tokenizer_sha: str, cfg: PrepareConfig) -> str:
    files = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    blob = json.dumps({"v": PIPELINE_VERSION, "files": files, "tok": tokenizer_sha, "cfg": cfg.to_dict()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _open_work_dir(work: str, fp: str, paths: list[str], cfg: PrepareConfig) -> list[Chunk]:
    plan_file = os.path.join(work, "plan.json")
    if os.path.isfile(plan_file):
        with open(plan_file, encoding="utf-8") as f:
            plan = json.load(f)
        if plan.get("fingerprint") == fp:
            return [Chunk(**c) for c in plan["chunks"]]
        log.warning("discarding %s: it was made from other inputs, tokenizer or config", work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "chunks"))
    chunks = plan_chunks(paths, cfg.input)
    _write_json(plan_file, {"fingerprint": fp, "chunks": [c.to_dict() for c in chunks]})
    return chunks


def _preload_mds_writer() -> threading.Thread | None:
    """Import the MDS writer's package in a thread while the workers run: ``streaming`` pulls in
    torch and transformers, seconds of CPU that would otherwise follow the workers."""
    if "streaming" in sys.modules:
        return None
    # What the main thread imports meanwhile, imported first: two threads importing one module
    # tree from both ends can trip the import system's deadlock detection.
    import multiprocessing.pool  # noqa: F401
    import multiprocessing.popen_spawn_posix  # noqa: F401

    import tqdm  # noqa: F401

    def load() -> None:
        try:
            import streaming  # noqa: F401
        except Exception:  # noqa: BLE001 - the import in write_samples_to_mds reports it
            pass

    thread = threading.Thread(target=load, name="kiln-prepare-preload", daemon=True)
    thread.start()
    return thread


def _run_chunks(pending: list[Chunk], done_bytes: int, total_bytes: int, workers: int, cfg: PrepareConfig,
                tokenizer: str, chunks_dir: str, progress: str) -> None:
    shown = PrepareProgress(progress, total_bytes=total_bytes, done_bytes=done_bytes)
    init_args = (cfg.to_dict(), tokenizer, chunks_dir)
    try:
        if workers == 1 or len(pending) <= 1:
            init_worker(*init_args, in_subprocess=False)
            for c in pending:
                _, stats = process_chunk(c)
                shown.chunk_done(c.nbytes, stats["documents_in"])
            return
        # spawn, not fork: the parent may hold threads (tqdm's monitor, tokenizers' pool).
        ctx = multiprocessing.get_context("spawn")
        by_index = {c.index: c for c in pending}
        with ctx.Pool(min(workers, len(pending)), initializer=init_worker, initargs=init_args) as pool:
            for index, stats in pool.imap_unordered(process_chunk, pending, chunksize=1):
                shown.chunk_done(by_index[index].nbytes, stats["documents_in"])
    finally:
        shown.close()


def _dedup(chunks: list[Chunk], chunks_dir: str, cfg: PrepareConfig, counts: list[int]) -> tuple[np.ndarray, Counter]:
    """The keep mask over every filtered document, in order, and the duplicates dropped by kind."""
    total = sum(counts)
    keep = np.ones(total, dtype=bool)
    dropped: Counter = Counter()
    if cfg.dedup.mode == "none" or total == 0:
        return keep, dropped
    hashes = np.concatenate([load_result(chunks_dir, c.index, ("exact",))["exact"] for c in chunks])
    keep = decide_exact(hashes)
    dropped["exact_duplicate"] = int(total - keep.sum())
    if cfg.dedup.mode == "near":
        # Near-dedup among the exact survivors only; one signature matrix for the whole dataset.
        survivors = np.flatnonzero(keep)
        sigs = np.concatenate([load_result(chunks_dir, c.index, ("minhash",))["minhash"] for c in chunks])
        near_keep = decide_near(sigs[survivors], cfg.dedup)
        keep[survivors[~near_keep]] = False
        dropped["near_duplicate"] = int((~near_keep).sum())
    return keep, dropped


def _samples(chunks: list[Chunk], chunks_dir: str, keep: np.ndarray, counts: list[int], seq_len: int, eos: int,
             dtype: np.dtype, totals: dict) -> Iterator[np.ndarray]:
    """The packing of :func:`kiln.data.pack.pack_text_to_mds`: documents + EOS, samples of seq_len + 1, stride seq_len."""
    packer = SamplePacker(seq_len, dtype)
    offset = 0
    for c, n in zip(chunks, counts):
        r = load_result(chunks_dir, c.index, ("tokens", "doc_tokens", "doc_bytes"))
        k = keep[offset: offset + n]
        offset += n
        totals["documents"] += int(k.sum())
        totals["bytes_kept"] += int(r["doc_bytes"][k].sum())
        if not k.any():
            continue
        # The kept documents' tokens, each followed by EOS: every position but the EOS ones
        # takes the next token of the kept documents, in order.
        lengths = r["doc_tokens"]
        kept_tokens = r["tokens"][np.repeat(k, lengths)]
        ends = np.cumsum(lengths[k] + 1)
        flat = np.full(int(ends[-1]), eos, dtype=np.int64)
        is_token = np.ones(len(flat), dtype=bool)
        is_token[ends - 1] = False
        flat[is_token] = kept_tokens
        totals["tokens"] += len(flat)
        yield from packer.feed(flat)
    totals["dropped_tail_tokens"] = packer.dropped_tokens


def _summarise(chunk_stats: list[dict], dedup_dropped: Counter, totals: dict, samples: int, wall: float,
               processed: list[int], paths: list[str], cfg: PrepareConfig, fp: str) -> dict:
    dropped: Counter = Counter()
    pii: Counter = Counter()
    fim: Counter = Counter()
    for s in chunk_stats:
        dropped.update(s["dropped"])
        pii.update(s["pii"])
        fim.update(s["fim"])
    filtered_in = sum(s["documents_kept"] for s in chunk_stats)
    dups = sum(dedup_dropped.values())
    dropped.update(dedup_dropped)
    bytes_in = sum(s["bytes_in"] for s in chunk_stats)
    run_bytes = sum(chunk_stats[i]["bytes_in"] for i in processed)
    worker_s = sum(chunk_stats[i]["seconds"] for i in processed)
    return {
        "fingerprint": fp,
        "inputs": {"files": len(paths), "chunks": len(chunk_stats), "input_bytes": sum(s["input_bytes"] for s in chunk_stats)},
        "documents_in": sum(s["documents_in"] for s in chunk_stats),
        "documents_after_filters": filtered_in,
        "documents_kept": totals["documents"],
        "dropped": dict(sorted(dropped.items())),
        "duplicate_rate": dups / filtered_in if filtered_in else 0.0,
        "pii_replaced": dict(sorted(pii.items())),
        "fim_documents": dict(sorted(fim.items())),
        "bytes_in": bytes_in,
        "bytes_kept": totals["bytes_kept"],
        "tokens": totals["tokens"],
        "samples": samples,
        "seq_len": cfg.pack.seq_len,
        "dropped_tail_tokens": totals["dropped_tail_tokens"],
        "run": {  # this invocation only: a resumed run reuses chunks and reports what it did itself
            "wall_s": round(wall, 3),
            "chunks_processed": len(processed),
            "chunks_reused": len(chunk_stats) - len(processed),
            "worker_s": round(worker_s, 3),
            "mb_per_s": round(run_bytes / 1e6 / wall, 3) if wall > 0 else None,
            "tokens_per_s": round(totals["tokens"] * run_bytes / max(bytes_in, 1) / wall, 1) if wall > 0 else None,
        },
        "config": cfg.to_dict(),
    }


def prepare(inputs: list[str], out: str, tokenizer: str, cfg: PrepareConfig, *, workers: int | None = None,
            overwrite: bool = False, progress: str | bool = "auto") -> dict:
    """Prepare ``inputs`` into the MDS dataset ``out``; return the stats (also in ``out/stats.json``).

    ``progress``: auto, bar, plain or off (:mod:`.progress`); True is auto, False off."""
    t0 = time.perf_counter()
    progress = progress_mode(progress)
    workers = workers or default_workers()
    if workers < 1:
        raise KilnDataError(f"--workers must be >= 1, got {workers}")
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    if cfg.fim.rate > 0:
        from kiln.data.prepare.encode import DocEncoder

        DocEncoder(tokenizer).check_fim(tokenizer)  # fail before any work, not in a worker
    tok_sha = file_sha256(tokenizer)
    fp = fingerprint(paths, tok_sha, cfg)
    work = os.path.join(parent, f".{name}.kiln-prepare")
    lock_path = os.path.join(parent, f".{name}.kiln-prepare.lock")
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KilnDataError(f"another `kiln data prepare` is writing {out}") from None
        if is_complete_dataset(out):
            stats_path = os.path.join(out, STATS_FILE)
            if os.path.isfile(stats_path):
                with open(stats_path, encoding="utf-8") as f:
                    stats = json.load(f)
                if stats.get("fingerprint") == fp:  # finished, killed before the work dir went
                    shutil.rmtree(work, ignore_errors=True)
                    log.info("%s is already prepared from these inputs and config", out)
                    return stats
            if not overwrite:
                raise KilnDataError(f"{out} already holds a dataset made from other inputs or config; "
                                    f"pass --overwrite to replace it")
        elif os.path.exists(out) and not overwrite:
            raise KilnDataError(f"{out} exists and is not a kiln dataset; remove it or pass --overwrite")

        chunks = _open_work_dir(work, fp, paths, cfg)
        chunks_dir = os.path.join(work, "chunks")
        pending = [c for c in chunks if not os.path.isfile(result_path(chunks_dir, c.index))]
        for entry in os.listdir(chunks_dir):  # partial results of a killed run
            if ".tmp." in entry:
                os.remove(os.path.join(chunks_dir, entry))
        if len(pending) < len(chunks):
            log.info("resuming: %d of %d chunks already done", len(chunks) - len(pending), len(chunks))
        done_bytes = sum(c.nbytes for c in chunks) - sum(c.nbytes for c in pending)
        preload = _preload_mds_writer() if workers > 1 and len(pending) > 1 else None
        try:
            _run_chunks(pending, done_bytes, sum(c.nbytes for c in chunks), workers, cfg, tokenizer, chunks_dir,
                        progress)
        finally:
            if preload is not None:
                preload.join()
        chunk_stats = [load_stats(chunks_dir, c.index) for c in chunks]
        counts = [s["documents_kept"] for s in chunk_stats]

        keep_file = os.path.join(work, "keep.npz")
        if os.path.isfile(keep_file):
            with np.load(keep_file) as z:
                keep, dedup_dropped = z["keep"], Counter(json.loads(str(z["dropped"])))
        else:
            keep, dedup_dropped = _dedup(chunks, chunks_dir, cfg, counts)
            tmp = f"{keep_file}.tmp.{os.getpid()}"
            with open(tmp, "wb") as f:
                np.savez(f, keep=keep, dropped=np.array(json.dumps(dict(dedup_dropped))))
            os.replace(tmp, keep_file)

        staging = os.path.join(work, "dataset")
        for entry in os.listdir(work):  # temp dirs of a killed write_samples_to_mds
            if entry.startswith(f".dataset{TMP_MARK}"):
                shutil.rmtree(os.path.join(work, entry), ignore_errors=True)
        totals = Counter(documents=0, bytes_kept=0, tokens=0, dropped_tail_tokens=0)
        samples_iter = _samples(chunks, chunks_dir, keep, counts, cfg.pack.seq_len, tok.eos_id,
                                token_dtype(tok.vocab_size), totals)
        if is_complete_dataset(staging):
            for _ in samples_iter:  # recount what the finished shards hold (cheap: no writing)
                pass
            with open(os.path.join(staging, "kiln_meta.json"), encoding="utf-8") as f:
                n_samples = int(json.load(f)["samples"])
        else:
            shutil.rmtree(staging, ignore_errors=True)
            meta = {"eos_id": tok.eos_id, "tokenizer_sha256": tok_sha, "sample_overlap": 1,
                    "sources": [os.path.relpath(p, parent) for p in paths[:1000]], "prepare_fingerprint": fp}
            n_samples = write_samples_to_mds(
                samples_iter, staging, sample_len=cfg.pack.seq_len + 1, vocab_size=tok.vocab_size,
                meta=lambda: {**meta, "documents": totals["documents"], "tokens": totals["tokens"]},
                size_limit=cfg.pack.shard_size_limit)
        processed = [c.index for c in pending]
        stats = _summarise(chunk_stats, dedup_dropped, totals, n_samples, time.perf_counter() - t0, processed,
                           paths, cfg, fp)
        _write_json(os.path.join(staging, STATS_FILE), stats)
        if os.path.exists(out):  # --overwrite: swap the old one out first
            old = os.path.join(work, "old")
            os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(work, ignore_errors=True)
        os.remove(lock_path)  # still held: a rival run fails on LOCK_NB rather than waiting on it
    log.info("prepared %s: %d documents kept of %d, %d tokens, %d samples", out, stats["documents_kept"],
             stats["documents_in"], stats["tokens"], n_samples)
    return stats
