"""The bundled dataset: built on demand, cached, safe under concurrent callers."""

import os
import tempfile
import threading

import pytest

import kiln.data.bundled as bundled
from kiln.data.bundled import bundled_dataset_key, default_cache_dir, ensure_bundled_dataset
from kiln.data.loader import build_train_loader, dataset_seq_len
from kiln.data.pack import TMP_MARK, is_complete_dataset, read_meta


@pytest.fixture(autouse=True)
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # streaming's file locks live there
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def test_cache_dir_from_env(tmp_path):
    assert default_cache_dir() == str(tmp_path / "cache" / "datasets")
    assert "seq64" in bundled_dataset_key(64) and bundled_dataset_key(64) != bundled_dataset_key(65)


def test_bundled_builds_and_loads(tmp_path):
    path = ensure_bundled_dataset(64)
    assert path.startswith(str(tmp_path / "cache" / "datasets")) and is_complete_dataset(path)
    meta = read_meta(path)
    assert meta["documents"] == 1189 and meta["samples"] > 10_000 and dataset_seq_len(path) == 64
    assert ensure_bundled_dataset(64) == path  # cached

    loader = build_train_loader(path, micro_batch_size=4, seed=0, dp_rank=0, dp_size=1)
    assert (loader.seq_len, loader.vocab_size, loader.eos_id) == (64, 4096, 0)
    batch = next(loader)
    tokens = batch["tokens"]
    assert tokens.shape == (4, 65) and str(tokens.dtype) == "torch.int64"
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 4096


def test_concurrent_callers_prepare_once(tmp_path, monkeypatch):
    calls = []
    real = bundled.pack_text_to_mds
    monkeypatch.setattr(bundled, "pack_text_to_mds", lambda *a, **k: calls.append(1) or real(*a, **k))
    paths, errors = [], []

    def call():
        try:
            paths.append(ensure_bundled_dataset(256))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1 and len(calls) == 1
    assert is_complete_dataset(paths[0])


def test_leftover_temp_dir_is_ignored_and_removed(tmp_path):
    cache = tmp_path / "cache" / "datasets"
    key = bundled_dataset_key(128)
    leftover = cache / f".{key}{TMP_MARK}dead"
    leftover.mkdir(parents=True)
    (leftover / "index.json").write_text("{}")  # looks complete-ish, but lives under the temp name
    path = ensure_bundled_dataset(128)
    assert path == str(cache / key) and is_complete_dataset(path)
    assert not leftover.exists()
    assert sorted(os.listdir(cache)) == [key, f"{key}.lock"]
