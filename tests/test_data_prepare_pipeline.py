"""The whole of `kiln data prepare`: the trainer's loader reads it, FIM, kill-and-resume, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from kiln.data.prepare import prepare, prepare_config_from_dict, train_tokenizer
from kiln.data.prepare.encode import FIM_TOKENS
from kiln.data.tokenizer import bundled_tokenizer_path, load_tokenizer
from kiln.errors import KilnDataError
from tests.kiln_run import REPO, kiln
from tests.test_data_prepare_common import prose


def read_samples(path: str) -> list[np.ndarray]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=path, batch_size=1, shuffle=False)
    return [np.asarray(ds[i]["tokens"]) for i in range(ds.num_samples)]


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    os.makedirs(tmp_path / "t")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))  # streaming's file locks live there


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def corpus(tmp_path, n=60, files=3):
    """Clean docs, with an exact duplicate, a near duplicate, a junk doc and an e-mail planted."""
    docs = [prose(i) for i in range(n)]
    docs[5] += " Mail me at someone@example.org today."
    docs[20] = docs[3].upper()  # exact duplicate (normalised)
    if n > 40:
        docs[30] = docs[4].replace(" ", " lantern ", 1)  # near duplicate: one word more
        docs[40] = "buy now " * 3  # too short
    (tmp_path / "in").mkdir()
    per = -(-n // files)
    for f in range(files):
        write_jsonl(tmp_path / "in" / f"part{f}.jsonl", docs[f * per:(f + 1) * per])
    return docs, str(tmp_path / "in")


def test_prepared_dataset_loads_and_decodes_to_kept_text(tmp_path, monkeypatch):
    from kiln.data.loader import build_train_loader

    docs, inputs = corpus(tmp_path)
    cfg = prepare_config_from_dict({"pack": {"seq_len": 32}, "dedup": {"mode": "near"}, "input": {"chunk_bytes": 4096}})
    stats = prepare([inputs], str(tmp_path / "ds"), bundled_tokenizer_path(), cfg, workers=2, progress=False)
    assert stats["documents_in"] == 60
    assert stats["dropped"]["exact_duplicate"] == 1 and stats["dropped"]["near_duplicate"] == 1
    assert stats["dropped"]["too_few_words"] == 1 and stats["documents_kept"] == 57
    assert stats["pii_replaced"] == {"email": 1}
    assert stats["inputs"]["chunks"] > 3  # dedup across chunks and workers, not within one
    assert os.path.isfile(tmp_path / "ds" / "stats.json")
    assert not os.path.exists(tmp_path / ".ds.kiln-prepare")  # the work dir goes when done

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    loader = build_train_loader(str(tmp_path / "ds"), micro_batch_size=4, seed=0, shuffle=False, dp_rank=0, dp_size=1)
    assert loader.seq_len == 32
    tok = load_tokenizer(bundled_tokenizer_path())
    stream = []
    for _ in range(stats["samples"] // 4):
        batch = next(loader)["tokens"]
        assert batch.shape == (4, 33)
        for row in batch.tolist():
            stream.extend(row[:-1])  # consecutive samples overlap by one token
    text = tok.decode(stream)
    kept = [d for i, d in enumerate(docs) if i not in (20, 30, 40)]
    kept[5] = kept[5].replace("someone@example.org", "<EMAIL>")
    expected = "<|endoftext|>".join(kept) + "<|endoftext|>"
    assert expected.startswith(text) and len(text) > 0.9 * len(expected)


def test_fim_format_and_missing_sentinels(tmp_path):
    docs, inputs = corpus(tmp_path, n=30, files=1)
    tok_path = train_tokenizer([inputs], 400, str(tmp_path / "tok"))
    tok = load_tokenizer(tok_path)
    pre, mid, suf = (tok._tok.token_to_id(t) for t in ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"))
    assert None not in (pre, mid, suf)
    cfg = prepare_config_from_dict({"pack": {"seq_len": 16}, "fim": {"rate": 1.0, "spm_rate": 0.5}, "seed": 7,
                                    "dedup": {"mode": "none"}, "quality": {"enabled": False},
                                    "pii": {"email": False}})
    stats = prepare([inputs], str(tmp_path / "ds"), tok_path, cfg, workers=1, progress=False)
    assert sum(stats["fim_documents"].values()) == 30 and set(stats["fim_documents"]) == {"psm", "spm"}
    samples = read_samples(str(tmp_path / "ds"))
    stream = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]]).tolist()
    n_docs = 0
    for ids in _split(stream, tok.eos_id)[:-1]:  # the last may be cut by the packing
        n_docs += 1
        assert ids[0] == pre and ids.count(pre) == ids.count(mid) == ids.count(suf) == 1
        if ids[1] == suf:  # SPM: <pre><suf> suffix <mid> prefix middle
            suffix, rest = ids[2:ids.index(mid)], ids[ids.index(mid) + 1:]
            text = tok.decode(rest) + tok.decode(suffix)
        else:  # PSM: <pre> prefix <suf> suffix <mid> middle
            prefix, suffix = ids[1:ids.index(suf)], ids[ids.index(suf) + 1:ids.index(mid)]
            text = tok.decode(prefix) + tok.decode(ids[ids.index(mid) + 1:]) + tok.decode(suffix)
        assert text in docs
    assert n_docs >= 25
    # Same seed, same output: FIM choices do not depend on workers or timing.
    prepare([inputs], str(tmp_path / "ds2"), tok_path, cfg, workers=2, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(samples, read_samples(str(tmp_path / "ds2"))))
    with pytest.raises(KilnDataError, match=r"lacks the FIM sentinel.*kiln data train-tokenizer"):
        prepare([inputs], str(tmp_path / "ds3"), bundled_tokenizer_path(), cfg, workers=1, progress=False)


def _split(stream: list[int], eos: int) -> list[list[int]]:
    docs, cur = [], []
    for t in stream:
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs + [cur]


def _start_prepare(inputs, out, config):
    cmd = [sys.executable, "-m", "kiln", "data", "prepare", inputs, "--out", out, "--tokenizer",
           bundled_tokenizer_path(), "--workers", "2", "--config", config, "--dedup", "near", "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _kill_when(proc, ready, timeout=120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as Slurm or an OOM kill would
            proc.wait()
            return True
        time.sleep(0.005)
    return False


def test_killed_prepare_resumes_to_the_same_dataset(tmp_path):
    docs = [prose(i, n_words=60 + i % 50) for i in range(1500)]
    docs[700] = docs[100].upper()
    (tmp_path / "in").mkdir()
    for f in range(3):
        write_jsonl(tmp_path / "in" / f"p{f}.jsonl", docs[f * 500:(f + 1) * 500])
    config = tmp_path / "prep.yaml"
    config.write_text("input:\n  chunk_bytes: 8192\npack:\n  seq_len: 64\n")
    out = str(tmp_path / "ds")
    work = tmp_path / ".ds.kiln-prepare"
    chunks_dir = work / "chunks"

    def n_chunks():
        return len([f for f in os.listdir(chunks_dir) if f.endswith(".npz")]) if chunks_dir.is_dir() else 0

    # Kill 1: while workers are writing chunk results.
    proc = _start_prepare(str(tmp_path / "in"), out, str(config))
    assert _kill_when(proc, lambda: n_chunks() >= 3), proc.stderr.read().decode()[-2000:]
    total = len(json.loads((work / "plan.json").read_text())["chunks"])
    assert not os.path.exists(out) and 3 <= n_chunks() < total
    # Kill 2: after the dedup decision, while packing.
    proc = _start_prepare(str(tmp_path / "in"), out, str(config))
    assert _kill_when(proc, lambda: (work / "keep.npz").exists()), proc.stderr.read().decode()[-2000:]
    assert not os.path.exists(out) and n_chunks() == total
    # Re-run to the end.
    kiln("data", "prepare", str(tmp_path / "in"), "--out", out, "--tokenizer", bundled_tokenizer_path(),
         "--workers", "2", "--config", str(config), "--dedup", "near", "--no-progress")
    stats = json.loads((tmp_path / "ds" / "stats.json").read_text())
    assert stats["run"]["chunks_reused"] == total and stats["dropped"]["exact_duplicate"] == 1
    assert not work.exists()

    # An uninterrupted run, in one process: same samples.
    cfg = prepare_config_from_dict({"input": {"chunk_bytes": 8192}, "pack": {"seq_len": 64}, "dedup": {"mode": "near"}})
    ref = prepare([str(tmp_path / "in")], str(tmp_path / "ref"), bundled_tokenizer_path(), cfg, workers=1,
                  progress=False)
    got, want = read_samples(out), read_samples(str(tmp_path / "ref"))
    assert len(got) == len(want) == ref["samples"] and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert {k: v for k, v in stats.items() if k != "run"} == {k: v for k, v in ref.items() if k != "run"}


def test_cli_prepare_stats_and_train_tokenizer(tmp_path):
    _, inputs = corpus(tmp_path, n=22, files=2)
    r = kiln("data", "train-tokenizer", inputs, "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    tok_path = r.stdout.strip().splitlines()[-1]
    assert tok_path.endswith("tokenizer.json")
    assert all(load_tokenizer(tok_path)._tok.token_to_id(t) is not None for t in FIM_TOKENS)
    r = kiln("data", "prepare", inputs, "--out", str(tmp_path / "ds"), "--tokenizer", tok_path, "--seq-len", "16",
             "--workers", "2")
    assert "documents     22 in" in r.stdout and "exact_duplicate" in r.stdout
    assert "\r" not in r.stderr and "ETA" not in r.stderr  # a pipe: no progress bar (test_progress.py: a terminal)
    r = kiln("data", "stats", str(tmp_path / "ds"))
    assert "documents     22 in, 22 after filters, 21 kept" in r.stdout
    # Same arguments again: nothing to do; other arguments: a clear error.
    kiln("data", "prepare", inputs, "--out", str(tmp_path / "ds"), "--tokenizer", tok_path, "--seq-len", "16")
    r = kiln("data", "prepare", inputs, "--out", str(tmp_path / "ds"), "--tokenizer", tok_path, "--seq-len", "8",
             check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = kiln("data", "prepare", inputs, "--out", str(tmp_path / "x"), "--tokenizer", tok_path, "--bogus", check=False)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
