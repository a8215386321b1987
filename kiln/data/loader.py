"""The training data loader: an endless stream of micro-batches over an MDS dataset.

Built on mosaicml-streaming. What kiln relies on (checked against streaming 0.13.0):

* Global batch determinism. Streaming lays one epoch out as a single sample stream (fixed by
  the seed, the epoch and ``num_canonical_nodes``, not by the world), deals it round-robin to
  nodes then ranks, and each rank cuts its share into micro-batches. So step k of every rank
  together covers stream positions ``[k*G, (k+1)*G)`` with ``G = micro_batch_size * dp_size``,
  whatever ``dp_size`` is; with gradient accumulation ``A``, micro-batches ``k*A .. k*A+A-1``
  of every rank cover one global batch of ``G*A``. This needs ``num_canonical_nodes`` fixed
  (kiln uses 1: it divides every node count) and ``batch_size`` passed to the dataset.
* Epoch ends. Streaming pads an epoch to a multiple of the world size with repeated samples,
  which depends on the topology; kiln instead sets ``epoch_size`` to a multiple of the global
  batch (a seeded, topology-independent subset), so every epoch is a whole number of global
  batches. The trainer must pass ``global_batch_size`` when it accumulates gradients.
* Replication. Ranks ``[r*R, (r+1)*R)`` (one TP×CP×PP replica) form one streaming "rank"
  through ``replication=R`` and receive identical micro-batches.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from kiln.data.pack import INDEX_FILE, read_meta
from kiln.errors import KilnDataError

log = logging.getLogger(__name__)

_REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "azure-dl://", "hf://", "http://", "https://",
                   "sftp://", "dbfs:/", "wandb://")


def is_remote(path: str) -> bool:
    return path.startswith(_REMOTE_SCHEMES)


def dataset_seq_len(path: str) -> int:
    """seq_len of a local kiln dataset (each sample holds ``seq_len + 1`` tokens)."""
    if is_remote(path):
        raise KilnDataError(f"dataset_seq_len reads local datasets only; for {path} build the loader and use .seq_len")
    return int(read_meta(path)["seq_len"])


def _num_samples(path: str) -> int:
    import json

    with open(os.path.join(path, INDEX_FILE), encoding="utf-8") as f:
        return sum(int(s["samples"]) for s in json.load(f)["shards"])


def _check_world(dp_rank: int, dp_size: int, replication: int) -> None:
    """Streaming reads its world from the env; make sure it is the world the trainer means."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    world = int(env["WORLD_SIZE"] or 1)
    rank = int(env["RANK"] or 0)
    local_world = int(env["LOCAL_WORLD_SIZE"] or 1)
    expected = dp_size * replication
    if world != expected:
        raise KilnDataError(
            f"data loader: WORLD_SIZE={env['WORLD_SIZE']} but dp_size({dp_size}) × replication({replication}) = "
            f"{expected}; launch with torchrun (which sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE)")
    if rank // replication != dp_rank:
        raise KilnDataError(
            f"data loader: RANK={rank} gives dp_rank {rank} // replication({replication}) = {rank // replication}, "
            f"but the layout says dp_rank={dp_rank}; kiln expects DP as the outermost rank dimension")
    if world > 1 and (env["LOCAL_WORLD_SIZE"] is None or world % local_world):
        raise KilnDataError(
            f"data loader: LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']} must be set and divide WORLD_SIZE={world} "
            f"(streaming shares memory between the ranks of one node)")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        got = (dist.get_rank(), dist.get_world_size())
        if got != (rank, world):
            raise KilnDataError(f"data loader: torch.distributed has (rank, world) = {got} but the env says {(rank, world)}")


def _attach_waits_for_size() -> None:
    """Work around a race in streaming's shared memory (mosaicml/streaming#901, #966).

    ``SharedMemory(create=True)`` is ``shm_open`` then ``ftruncate``; a rank that attaches in
    between (streaming waits one 7 ms tick after FileExistsError) maps a zero-size segment and
    fails with "cannot mmap an empty file". It shows on loaded machines. Attaching here waits
    (up to 10 s) until the creator has sized the segment.
    """
    from streaming.base.shared import memory

    builtin = memory.BuiltinSharedMemory
    if getattr(builtin, "kiln_waits_for_size", False):
        return

    class SizedSharedMemory(builtin):
        kiln_waits_for_size = True

        def __init__(self, name=None, create=False, size=0):
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    super().__init__(name, create, size)
                    return
                except ValueError as err:  # the fd of the failed attach is not closed by the stdlib
                    if getattr(self, "_fd", -1) >= 0:
                        os.close(self._fd)
                    if create or "empty file" not in str(err) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)

    memory.BuiltinSharedMemory = SizedSharedMemory


@contextlib.contextmanager
def _streaming_registration_lock(timeout_s: float = 600.0) -> Iterator[None]:
    """Let one job at a time on this machine register streaming's shared memory.

    Every rank of a job picks the first free shared-memory prefix on its own, then the local
    leader claims it; another job (another run, a test) starting in between makes the ranks
    disagree ("shared memory registered does not match") or collide. So the local leader takes
    a machine-wide flock and the job's ranks wait for it at a barrier before constructing; the
    lock lives in /dev/shm, the namespace being protected, whatever TMPDIR each job has.
    """
    import torch.distributed as dist

    from kiln.parallel import collectives

    distributed = dist.is_available() and dist.is_initialized()
    leader = int(os.environ.get("LOCAL_RANK") or 0) == 0
    lock_dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd = None
    try:
        if leader:
            fd = os.open(os.path.join(lock_dir, "kiln-streaming-init.lock"), os.O_RDWR | os.O_CREAT, 0o666)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise KilnDataError(f"data loader: waited {timeout_s:.0f}s for {lock_dir}/kiln-streaming-init.lock, "
                                            f"held by another job building a dataset on this machine") from None
                    time.sleep(0.05)
        if distributed:
            collectives.barrier()  # no rank scans for a prefix before its leader holds the lock
        yield
        if distributed:
            collectives.barrier()  # the prefix is registered on every rank before the lock goes
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    import torch

    tokens = np.stack([s["tokens"] for s in samples]).astype(np.int64)
    return {"tokens": torch.from_numpy(tokens)}  # [micro_batch_size, seq_len + 1]


class TrainLoader:
    """Endless iterator of ``{"tokens": LongTensor[micro_batch_size, seq_len + 1]}``, plus with
    ``documents`` each input token's document number (``"documents"``, [micro_batch_size, seq_len]).

    Iterate it once (``next(loader)``); its ``state_dict`` goes into each checkpoint and
    ``load_state_dict`` must be called before the first batch. With ``prefetch > 0`` a
    background thread reads that many micro-batches ahead (shard reads and collation overlap
    the step; the GIL is free during torch's kernels); the state counts only the batches
    handed out, so a checkpoint never skips what was read ahead. Call ``close`` when done.
    """

    def __init__(self, dataset: Any, *, micro_batch_size: int, dp_size: int, num_workers: int,
                 meta: dict | None, prefetch: int = 0, pin_memory: bool = False, documents: bool = False) -> None:
        from streaming import StreamingDataLoader

        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_size = dp_size
        self.prefetch = prefetch
        self.meta = meta or {}
        self.seq_len: int = int(self.meta.get("seq_len") or 0)
        self.vocab_size: int | None = self.meta.get("vocab_size")
        self.eos_id: int | None = self.meta.get("eos_id")
        if documents and self.eos_id is None:
            raise KilnDataError("data.reset_attention_at_eos needs the dataset's end-of-document token, and its "
                                "metadata has no eos_id; prepare it with `kiln data prepare` or set "
                                "data.reset_attention_at_eos=false")
        self.documents = documents
        # drop_last: the epoch is a whole number of micro-batches anyway (see module docstring);
        # this only guards the trainer against a ragged batch if that assumption ever breaks.
        self._loader = StreamingDataLoader(dataset, batch_size=micro_batch_size, num_workers=num_workers,
                                           collate_fn=_collate, drop_last=True, pin_memory=pin_memory,
                                           persistent_workers=num_workers > 0)
        self.epoch = 0  # position after the last batch handed out
        self.batches_in_epoch = 0
        self._gen: Iterator[tuple[dict[str, torch.Tensor], int, int]] | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _batches(self) -> Iterator[tuple[dict[str, torch.Tensor], int, int]]:
        """(batch, epoch, batches_in_epoch after it) from the loaded position onwards."""
        epoch, in_epoch = self.epoch, self.batches_in_epoch
        empty_epochs = 0
        while True:
            got = False
            # Each iter() over the streaming loader starts streaming's next epoch (or resumes).
            for batch in self._loader:
                got = True
                if self.documents:  # here, in the read-ahead thread, not on the step's path
                    from kiln.kernels.documents import document_map

                    batch["documents"] = document_map(batch["tokens"][:, :-1], self.eos_id)
                in_epoch += 1
                yield batch, epoch, in_epoch
            epoch, in_epoch = epoch + 1, 0
            empty_epochs = 0 if got else empty_epochs + 1
            if empty_epochs >= 2:  # one empty epoch is normal after resuming exactly at its end
                raise KilnDataError("data loader: two epochs in a row yielded no micro-batch; the dataset is empty")

    def _read_ahead(self) -> None:
        assert self._queue is not None and self._gen is not None
        try:
            for item in self._gen:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(e)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._gen is None:
            self._gen = self._batches()
            if self.prefetch > 0:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._read_ahead, name="kiln-data-prefetch", daemon=True)
                self._thread.start()
        item = self._queue.get() if self._queue is not None else next(self._gen)
        if isinstance(item, BaseException):
            raise item
        batch, self.epoch, self.batches_in_epoch = item
        return batch

    def close(self) -> None:
        """Stop the read-ahead thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def state_dict(self) -> dict[str, Any]:
        """Position in the global sample stream; the same on every rank, valid for any dp_size."""
        return {
            "epoch": self.epoch,
            "sample_in_epoch": self.batches_in_epoch * self.micro_batch_size * self.dp_size,
            "num_canonical_nodes": self.dataset.num_canonical_nodes,
            "shuffle_seed": self.dataset.shuffle_seed,
        }

    def stream_position(self) -> tuple[int, int]:
        """(epoch, sample_in_epoch) of the next micro-batch: names a global batch on any topology."""
        return self.epoch, self.batches_in_epoch * self.micro_batch_size * self.dp_size

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go to a saved position: at start-up, or mid-run for a rollback (the read-ahead is dropped)."""
        rewind = self._gen is not None
        if rewind:
            self.close()
            self._gen.close()  # ends streaming's iteration of the abandoned epoch
            self._gen = self._queue = None
            self._stop = threading.Event()
        g = self.micro_batch_size * self.dp_size
        if state["sample_in_epoch"] % g:
            raise KilnDataError(
                f"data loader: resuming at sample {state['sample_in_epoch']} of epoch {state['epoch']}, which is not "
                f"a multiple of micro_batch_size({self.micro_batch_size}) × dp_size({self.dp_size}) = {g}")
        if rewind:  # streaming takes a saved epoch older than its running one for stale and starts the next
            self.dataset.next_epoch = int(state["epoch"])
        self.dataset.load_state_dict(dict(state))
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["sample_in_epoch"]) // g


def build_train_loader(
    source: str | list[dict[str, Any]],
    *,
    micro_batch_size: int,
    seed: int,
    shuffle: bool = True,
    dp_rank: int,
    dp_size: int,
    replication: int = 1,
    num_workers: int = 0,
    prefetch: int = 0,
    global_batch_size: int | None = None,
    num_canonical_nodes: int = 1,
    cache_dir: str | None = None,
    pin_memory: bool = False,
    documents: bool = False,
) -> TrainLoader:
    """Build the endless micro-batch iterator of this rank. Collective: every rank calls it.

    ``source`` is one dataset (a path or URL) or a mixture: ``[{"path", "proportion" | "repeat"}]``,
    mixed by streaming's ``Stream`` weights (each epoch draws exactly ``proportion`` of its
    samples from each stream, or every stream ``repeat`` times). ``global_batch_size``
    (micro-batch × dp × accumulation; default micro-batch × dp) makes every epoch a whole
    number of global batches. ``prefetch`` micro-batches are read ahead by a background thread
    (0: on demand). ``pin_memory`` (GPU runs) collates into page-locked host memory, so the
    step's ``.to(device, non_blocking=True)`` is a true asynchronous copy. A remote path (``s3://…``) is cached under ``cache_dir``
    (default ``$KILN_CACHE_DIR/streaming/<hash>``).
    ``documents`` adds document maps for document masking (kiln.kernels.documents).
    """
    from streaming import Stream, StreamingDataset

    if micro_batch_size < 1 or dp_size < 1 or replication < 1 or not 0 <= dp_rank < dp_size:
        raise KilnDataError(f"data loader: bad micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, "
                            f"dp_size={dp_size}, replication={replication}")
    step = micro_batch_size * dp_size
    gbs = global_batch_size or step
    if gbs % step:
        raise KilnDataError(f"data loader: global_batch_size({gbs}) is not a multiple of "
                            f"micro_batch_size({micro_batch_size}) × dp_size({dp_size}) = {step}")
    _check_world(dp_rank, dp_size, replication)

    mixture = not isinstance(source, str)
    streams = [dict(s) for s in source] if mixture else [{"path": source}]
    located = [_locate(s["path"], cache_dir) for s in streams]  # (location kwargs, meta, samples)
    meta = _common_meta([m for _, m, _ in located], [s["path"] for s in streams])
    kwargs: dict[str, Any] = {}
    counts = [n for _, _, n in located]
    weights = [{"proportion": s.get("proportion"), "repeat": s.get("repeat")} for s in streams]
    if all(n is not None for n in counts):
        repeats = [s.get("repeat") or 1.0 for s in streams]
        total = int(sum(n * r for n, r in zip(counts, repeats)))
        kwargs["epoch_size"] = max(gbs, total // gbs * gbs)
        if mixture and any(s.get("repeat") for s in streams):
            # Streaming takes no epoch size with repeats; the same shares as proportions do,
            # and keep the epoch a whole number of global batches.
            weights = [{"proportion": n * r / total, "repeat": None} for n, r in zip(counts, repeats)]
        if total < gbs:
            log.warning("data %s has %d samples, fewer than one global batch (%d): samples repeat", source, total, gbs)
    else:
        log.warning("remote dataset in %s: epoch size is not aligned to the global batch (sample count unknown "
                    "before download); the last global batch of an epoch may differ between topologies", source)
    if mixture:
        kwargs["streams"] = [Stream(**where, **weight) for (where, _, _), weight in zip(located, weights)]
    else:
        kwargs.update(located[0][0])

    _attach_waits_for_size()
    try:
        with _streaming_registration_lock():
            dataset = StreamingDataset(
                **kwargs,
                batch_size=micro_batch_size,  # streaming cuts each rank's share into batches of this size
                shuffle=shuffle,
                shuffle_algo="py1e",
                shuffle_seed=seed,
                num_canonical_nodes=num_canonical_nodes,
                partition_algo="orig",
                replication=replication if replication > 1 else None,
            )
    except ValueError as e:
        if "Reused local directory" in str(e):
            raise KilnDataError(
                f"data loader: streaming found shared memory of an earlier run on {source} (a killed job?); "
                f"call kiln.data.loader.clean_stale_shm() once at job start, or use another cache_dir") from e
        raise
    loader = TrainLoader(dataset, micro_batch_size=micro_batch_size, dp_size=dp_size, num_workers=num_workers,
                         meta=meta, prefetch=prefetch, pin_memory=pin_memory, documents=documents)
    if not loader.seq_len:
        # Remote: the index is in the local cache now; read the width of the tokens column.
        loader.seq_len = int(dataset.shards[0].column_encodings[0].rsplit(":", 1)[-1]) - 1
    return loader


def _locate(path: str, cache_dir: str | None) -> tuple[dict[str, str], dict | None, int | None]:
    """Streaming location kwargs, kiln metadata and sample count (None, None for remote data)."""
    if is_remote(path):
        root = os.environ.get("KILN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
        local = os.path.join(cache_dir or os.path.join(root, "streaming"), hashlib.sha256(path.encode()).hexdigest()[:16])
        return {"remote": path, "local": local}, None, None
    if not os.path.isfile(os.path.join(path, INDEX_FILE)):
        raise KilnDataError(f"no MDS dataset at {path} ({INDEX_FILE} missing); prepare it with `kiln data prepare`")
    return {"local": os.path.abspath(path)}, read_meta(path), _num_samples(path)


def _common_meta(metas: list[dict | None], paths: list[str]) -> dict | None:
    """The metadata every local stream agrees on; mixed sample lengths or vocabularies are an error."""
    known = [(m, p) for m, p in zip(metas, paths) if m is not None]
    for key in ("seq_len", "vocab_size"):
        values = {m.get(key) for m, _ in known}
        if len(values) > 1:
            listing = ", ".join(f"{p}: {m.get(key)}" for m, p in known)
            raise KilnDataError(f"data.streams disagree on {key} ({listing}); prepare them with the same "
                                f"tokenizer and --seq-len")
    return known[0][0] if known else None


def clean_stale_shm() -> None:
    """Remove streaming shared memory left by killed jobs on this machine.

    Removes *every* streaming segment, live ones too: call it once at job start, on every rank
    (it is collective), before any dataset exists and only when no other job uses this machine.
    """
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
