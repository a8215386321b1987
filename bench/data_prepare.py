"""Throughput of `kiln data prepare` on ≥100 MB of reproducible synthetic text.

    OMP_NUM_THREADS=1 .venv/bin/python bench/data_prepare.py [--mb 100] [--workers 2] [--dir /tmp/kiln-bench-prepare]

The documents come from a seeded bigram word model built from the bundled corpus, with planted
exact duplicates (5%), near duplicates (5%, ~3% of words changed), low-quality documents (3%) and
some PII. It runs prepare twice (tokenize + clean + exact dedup + pack; then with near dedup)
and, as the baseline measured in the same run, Hugging Face ``Tokenizer.encode_batch`` over the
same documents with the same number of threads, and prints MB/s, tokens/s, the ratios and the CPU
time of each run (with its workers: a bound that holds when other jobs share the cores). The
one-time ``import streaming`` (torch, transformers: ~5 s) is done and reported before the timings.

Results, `--mb 100`, 2 workers on 2 cores, the version before the segment table and this one
measured back to back, twice each (same machine, same quiet conditions):

    HF encode_batch (2 threads)   18.6-23.0 s   4.4-5.4 MB/s
    before   dedup=exact          19.8-20.3 s   4.9-5.1 MB/s  1.25-1.29 M tokens/s  CPU 37-38 s
             dedup=near           26.2-28.9 s   3.5-3.8 MB/s  0.84-0.93 M tokens/s  CPU 51-55 s
    now      dedup=exact           9.5-9.8 s   10.2-10.5 MB/s 2.60-2.69 M tokens/s  CPU 17-18 s
             dedup=near           12.0-12.4 s   8.1-8.4 MB/s  1.96-2.03 M tokens/s  CPU 22-23 s

A fresh process that also imports streaming itself (prepare overlaps that import with its
workers): dedup=exact 10.2-13.7 s (7.3-9.8 MB/s) now, 24.5-26.6 s (3.8-4.1 MB/s) before.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kiln.data.pack import iter_documents  # noqa: E402
from kiln.data.tokenizer import bundled_corpus_path, bundled_tokenizer_path  # noqa: E402


class WordModel:
    """Bigram model over the bundled corpus's words (verse numbers dropped)."""

    def __init__(self, seed: int) -> None:
        words = [w for doc in iter_documents([bundled_corpus_path()]) for w in doc.split() if not w.isdigit()]
        vocab, ids = np.unique(np.array(words), return_inverse=True)
        self.vocab = vocab.tolist()
        # Successors of each word, as a sorted array of (word, next) pairs: sampling a uniform
        # successor occurrence reproduces the bigram frequencies.
        order = np.argsort(ids[:-1], kind="stable")
        self.nexts = ids[1:][order].tolist()
        self.starts = np.searchsorted(ids[:-1][order], np.arange(len(vocab) + 1)).tolist()
        self.rng = np.random.default_rng(seed)

    def words(self, n: int) -> list[str]:
        out = []
        w = int(self.rng.integers(len(self.vocab)))
        starts, nexts, vocab = self.starts, self.nexts, self.vocab
        for x in self.rng.random(n).tolist():  # a Python loop, but once per bench
            lo, hi = starts[w], starts[w + 1]
            w = nexts[lo + int(x * (hi - lo))] if hi > lo else (w + 1) % len(vocab)
            out.append(vocab[w])
        return out


def generate(dir_: str, target_mb: int, seed: int = 0) -> tuple[list[str], int]:
    """JSONL files of synthetic documents; returns the paths and the text bytes."""
    model = WordModel(seed)
    rng = np.random.default_rng(seed + 1)
    os.makedirs(dir_, exist_ok=True)
    docs: list[str] = []
    total = 0
    while total < target_mb * 1_000_000:
        kind = rng.random()
        if kind < 0.05 and docs:  # exact duplicate (whitespace/case changes only)
            doc = docs[rng.integers(len(docs))].upper()
        elif kind < 0.10 and docs:  # near duplicate: ~3% of words replaced
            words = docs[rng.integers(len(docs))].split()
            for i in rng.choice(len(words), size=max(1, len(words) // 33), replace=False):
                words[i] = model.vocab[rng.integers(len(model.vocab))]
            doc = " ".join(words)
        elif kind < 0.13:  # low quality: one line repeated
            doc = "\n".join([" ".join(model.words(8))] * int(rng.integers(10, 40)))
        else:
            n = int(rng.integers(100, 1500))
            words = model.words(n)
            lines, i = [], 0
            while i < n:
                k = int(rng.integers(8, 30))
                lines.append(" ".join(words[i:i + k]) + ".")
                i += k
            if rng.random() < 0.05:
                lines.insert(1, f"Contact me at user{int(rng.integers(1e6))}@example.com or +1 (555) 123-{int(rng.integers(1000, 9999))}.")
            doc = "\n".join(lines)
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    paths = []
    per_file = -(-len(docs) // 8)
    for f in range(8):
        path = os.path.join(dir_, f"part-{f:02d}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            for d in docs[f * per_file:(f + 1) * per_file]:
                fh.write(json.dumps({"text": d}) + "\n")
        paths.append(path)
    return paths, total


def baseline_tokenize(paths: list[str], threads: int) -> tuple[float, int]:
    """HF tokenizers' encode_batch over the same documents (reading JSONL included)."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(bundled_tokenizer_path())
    t0 = time.perf_counter()
    tokens = 0
    for p in paths:
        with open(p, encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f]
        for s in range(0, len(docs), 1024):
            tokens += sum(len(e.ids) for e in tok.encode_batch(docs[s:s + 1024], add_special_tokens=False))
    return time.perf_counter() - t0, tokens


def cpu_seconds() -> float:
    """User + system CPU of this process and of its waited-for children (the prepare workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/kiln-bench-prepare")
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    from kiln.data.prepare import prepare, prepare_config_from_dict

    data_dir = os.path.join(args.dir, f"input-{args.mb}mb")
    t0 = time.perf_counter()
    if os.path.isdir(data_dir):
        paths = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir))
        print(f"reusing {data_dir}")
    else:
        paths, _ = generate(data_dir + ".tmp", args.mb)
        os.rename(data_dir + ".tmp", data_dir)
        paths = sorted(os.path.join(data_dir, os.path.basename(p)) for p in paths)
        print(f"generated {data_dir} in {time.perf_counter() - t0:.1f}s")
    on_disk = sum(os.path.getsize(p) for p in paths)

    base_s, base_tokens = baseline_tokenize(paths, args.workers)
    # The MDS writer's package (streaming, which imports torch and transformers) is imported
    # here, outside the timings, like tokenizers for the baseline: a one-time cost per process
    # (prepare overlaps it with its workers when it has to do the import itself).
    t, cpu = time.perf_counter(), cpu_seconds()
    import streaming  # noqa: F401

    import_s, import_cpu = time.perf_counter() - t, cpu_seconds() - cpu
    results = {}
    for mode in ("exact", "near"):
        out = os.path.join(args.dir, f"out-{mode}")
        cfg = prepare_config_from_dict({"dedup": {"mode": mode}, "pack": {"seq_len": args.seq_len}})
        t, cpu = time.perf_counter(), cpu_seconds()
        stats = prepare(paths, out, bundled_tokenizer_path(), cfg, workers=args.workers, overwrite=True,
                        progress=False)
        wall = time.perf_counter() - t
        results[mode] = (wall, cpu_seconds() - cpu, stats)
        shutil.rmtree(out, ignore_errors=True)

    text_mb = results["exact"][2]["bytes_in"] / 1e6
    print(f"\ninput: {len(paths)} JSONL files, {on_disk / 1e6:.1f} MB on disk, {text_mb:.1f} MB of text; "
          f"{args.workers} workers, {os.cpu_count()} cores")
    print(f"baseline  HF encode_batch ({args.workers} threads): {base_s:6.1f}s  {text_mb / base_s:6.2f} MB/s  "
          f"{base_tokens / base_s / 1e6:5.2f} M tokens/s")
    print(f"one-time  import streaming (not timed below): {import_s:5.1f}s wall, {import_cpu:5.1f}s CPU")
    for mode, (wall, cpu, s) in results.items():
        dropped = Counter(s["dropped"])
        print(f"prepare   dedup={mode:<5}                  {wall:6.1f}s  {text_mb / wall:6.2f} MB/s  "
              f"{s['tokens'] / wall / 1e6:5.2f} M tokens/s   ratio to baseline {base_s / wall:4.2f}x   "
              f"kept {s['documents_kept']}/{s['documents_in']}, exact dup {dropped['exact_duplicate']}, "
              f"near dup {dropped['near_duplicate']}, pii {sum(s['pii_replaced'].values())}")
        print(f"          CPU time (this process and its workers) {cpu:6.1f}s: {text_mb / cpu:5.2f} MB per CPU-second, "
              f"so at most {args.workers * text_mb / cpu:5.2f} MB/s on {args.workers} otherwise idle cores")


if __name__ == "__main__":
    main()
