"""The train loader in one process: shapes, epochs, resume, world checks."""

import tempfile
import time

import numpy as np
import pytest

from kiln.data.loader import build_train_loader, dataset_seq_len
from kiln.data.pack import write_samples_to_mds
from kiln.errors import KilnDataError

SAMPLE_LEN = 9


def make_dataset(path: str, n: int) -> str:
    """Sample i starts with token i, so a batch's first column names its samples."""
    samples = (np.concatenate([[i], np.arange(1, SAMPLE_LEN)]).astype(np.uint16) for i in range(n))
    write_samples_to_mds(samples, path, sample_len=SAMPLE_LEN, vocab_size=4096, size_limit=400,
                         meta={"eos_id": 0})
    return path


def ids(batch) -> list[int]:
    return batch["tokens"][:, 0].tolist()


@pytest.fixture(autouse=True)
def single_process(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    # streaming keeps file locks in the temp dir; keep them out of /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_batches_and_epochs(tmp_path):
    path = make_dataset(str(tmp_path / "ds"), 22)
    assert dataset_seq_len(path) == SAMPLE_LEN - 1
    loader = build_train_loader(path, micro_batch_size=4, seed=3, dp_rank=0, dp_size=1)
    batches = [next(loader) for _ in range(15)]  # 5 steps per epoch (20 of 22 samples), 3 epochs
    assert all(b["tokens"].shape == (4, SAMPLE_LEN) for b in batches)
    epochs = [sorted(i for b in batches[e * 5:(e + 1) * 5] for i in ids(b)) for e in range(3)]
    for ep in epochs:
        assert len(set(ep)) == 20 and set(ep) <= set(range(22))  # no repeats within an epoch
    assert [i for b in batches[:5] for i in ids(b)] != [i for b in batches[5:10] for i in ids(b)]  # reshuffled
    assert loader.epoch == 2 and loader.batches_in_epoch == 5  # the end of an epoch shows on the next call


def test_no_shuffle_is_in_order(tmp_path):
    path = make_dataset(str(tmp_path / "ds"), 12)
    loader = build_train_loader(path, micro_batch_size=3, seed=0, shuffle=False, dp_rank=0, dp_size=1)
    assert [ids(next(loader)) for _ in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_resume_is_exact_and_elastic(tmp_path):
    path = make_dataset(str(tmp_path / "ds"), 30)
    ref = build_train_loader(path, micro_batch_size=4, seed=7, dp_rank=0, dp_size=1)
    ref_steps = [sorted(ids(next(ref))) for _ in range(12)]  # 7 steps per epoch: crosses one

    first = build_train_loader(path, micro_batch_size=4, seed=7, dp_rank=0, dp_size=1)
    for _ in range(9):
        next(first)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["sample_in_epoch"] == 8

    # Same global batch (4), now as 2 micro-batches of 2: step k = micro-batches 2k, 2k+1.
    resumed = build_train_loader(path, micro_batch_size=2, seed=7, dp_rank=0, dp_size=1, global_batch_size=4)
    resumed.load_state_dict(state)
    got = [sorted(ids(next(resumed)) + ids(next(resumed))) for _ in range(3)]
    assert got == ref_steps[9:12]


@pytest.mark.parametrize("prefetch", [0, 3])
def test_rewind_mid_run_replays_the_same_batches(tmp_path, prefetch):
    """A rollback loads an earlier position into a loader that is mid-epoch (with its read-ahead
    thread running): the batches from there are those it handed out the first time, across an epoch end."""
    path = make_dataset(str(tmp_path / "ds"), 30)  # 7 micro-batches of 4 per epoch
    loader = build_train_loader(path, micro_batch_size=4, seed=7, dp_rank=0, dp_size=1, prefetch=prefetch)
    try:
        for _ in range(3):
            next(loader)
        saved, position = loader.state_dict(), loader.stream_position()
        first = [ids(next(loader)) for _ in range(6)]
        loader.load_state_dict(saved)
        assert loader.stream_position() == position == (0, 12)
        assert [ids(next(loader)) for _ in range(6)] == first
        assert loader.stream_position() == (1, 8)
    finally:
        loader.close()


def test_read_ahead_changes_neither_order_nor_state(tmp_path):
    """A prefetching loader hands out the same batches, and its checkpoint state counts only
    what it handed out: at an epoch end while the thread already reads the next epoch, too."""
    path = make_dataset(str(tmp_path / "ds"), 30)  # 7 micro-batches of 4 per epoch
    plain = build_train_loader(path, micro_batch_size=4, seed=5, dp_rank=0, dp_size=1)
    ahead = build_train_loader(path, micro_batch_size=4, seed=5, dp_rank=0, dp_size=1, prefetch=3)
    try:
        for step in range(1, 10):
            assert ids(next(ahead)) == ids(next(plain))
            if step in (7, 9):
                time.sleep(0.2)  # let the thread fill its queue past this point
                assert ahead.state_dict() == plain.state_dict()
        resumed = build_train_loader(path, micro_batch_size=4, seed=5, dp_rank=0, dp_size=1, prefetch=3)
        resumed.load_state_dict(ahead.state_dict())
        assert [ids(next(resumed)) for _ in range(4)] == [ids(next(plain)) for _ in range(4)]
        resumed.close()
    finally:
        ahead.close()


def test_world_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    path = make_dataset(str(tmp_path / "ds"), 8)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(KilnDataError, match=r"dp_size\(1\) × replication\(1\) = 1"):
        build_train_loader(path, micro_batch_size=1, seed=0, dp_rank=0, dp_size=1)
    with pytest.raises(KilnDataError, match="dp_rank=0"):
        build_train_loader(path, micro_batch_size=1, seed=0, dp_rank=0, dp_size=2, replication=2)


def test_bad_arguments(tmp_path):
    path = make_dataset(str(tmp_path / "ds"), 8)
    with pytest.raises(KilnDataError, match="global_batch_size"):
        build_train_loader(path, micro_batch_size=3, seed=0, dp_rank=0, dp_size=1, global_batch_size=4)
    with pytest.raises(KilnDataError, match="index.json"):
        build_train_loader(str(tmp_path / "nothing"), micro_batch_size=1, seed=0, dp_rank=0, dp_size=1)


@pytest.mark.parametrize("nodes,ranks_per_node,workers", [(1, 4, 1), (2, 2, 1), (4, 1, 1), (2, 2, 2), (1, 2, 3)])
def test_streaming_partition_global_batches_are_topology_free(nodes, ranks_per_node, workers):
    """The property the loader relies on, on multi-node layouts that one machine cannot run.

    With num_canonical_nodes=1 and an epoch that is a whole number of global batches, step k
    of all ranks together is stream positions [k*G, (k+1)*G), however G is split.
    """
    from streaming.base.partition import get_partitions

    epoch, global_batch = 48, 8
    dp = nodes * ranks_per_node
    mb = global_batch // dp
    ids = get_partitions("orig", epoch, 1, nodes, ranks_per_node, workers, mb)  # [node, rank, worker, batch, mb]
    per_rank = []
    for n in range(nodes):
        for r in range(ranks_per_node):
            w = ids[n, r]  # a DataLoader takes batches round-robin over its workers
            per_rank.append([w[b % workers, b // workers] for b in range(w.shape[0] * w.shape[1])])
    for k in range(epoch // global_batch):
        step = sorted(int(i) for rank in per_rank for i in rank[k])
        assert step == list(range(k * global_batch, (k + 1) * global_batch))


def test_attaching_to_shared_memory_waits_until_its_creator_sized_it():
    """streaming's attach can land between shm_open and ftruncate of the creator (streaming#901)."""
    import os
    import threading
    import uuid

    import _posixshmem
    from streaming.base.shared import memory

    from kiln.data.loader import _attach_waits_for_size

    _attach_waits_for_size()
    name = f"kiln-test-{uuid.uuid4().hex[:8]}"
    fd = _posixshmem.shm_open(f"/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)  # created, size 0
    sizer = threading.Timer(0.05, lambda: os.ftruncate(fd, 4096))
    sizer.start()
    try:
        attached = memory.BuiltinSharedMemory(name, False, 0)
        assert attached.size == 4096
        attached.close()
    finally:
        sizer.join()
        os.close(fd)
        _posixshmem.shm_unlink(f"/{name}")
