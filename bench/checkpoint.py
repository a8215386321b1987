"""How long a checkpoint save blocks training (async vs sync), and save/load throughput.

Builds a trainer exactly as ``kiln train`` does (kiln.train.run: init_parallel, build_batches,
build_run_engine (the engine parallel.engine names; megatron by default), Trainer with a
CheckpointManager; bundled dataset, W&B disabled, a temp dir),
then runs kiln's own loop (``Trainer.train``) once per variant and round with
``checkpoint.every=K``, alternating the variant order between rounds so drift in machine load
hits both alike. Every manager call, and the megatron pieces inside it, is timed in place.

    OMP_NUM_THREADS=2 .venv/bin/python bench/checkpoint.py                  # CPU, 1 process, 2-4 min
    OMP_NUM_THREADS=2 .venv/bin/python bench/checkpoint.py --try-fixes      # + variant async+fixes
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/checkpoint.py       # dp=2 over gloo
    python bench/checkpoint.py --preset gpu --json ckpt.json                # ~125M bf16 model, 1 GPU
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/checkpoint.py --preset cpu-large \
        --distributed-optimizer --save-every 2 --saves 3 --rounds 2         # 111M params, dp=2, ~10 min

Columns:

* ``blocked``: time the training thread spends in checkpoint work per save (median over the
  measured saves of all rounds). Sync: the whole ``save()``. Async: ``save()`` (less any wait
  for the *previous* save, which is charged to that one) + the ``poll()`` (or ``wait()``) that
  publishes it. ``step-time method`` cross-checks it from step times (the saving step's wall
  time − the median clean step, + the publishing call); it is only as good as the step-time
  noise allows. The first save of each run (it spawns megatron's writer-results server) and
  the last step's save (blocking in both modes, by design) are shown apart, not in the medians;
  ``idle poll`` is the non-blocking all-reduce after every step while a write is in flight.
* ``bg write`` / ``pub. lag``: how long the forked writer ran, and how long after it finished
  the next poll published the checkpoint. ``step slow``: what the writer cost the training
  steps it overlapped (their time − the median clean step, summed per save): not blocking, but
  on a machine without spare cores it is real.
* save MB/s: checkpoint bytes (its manifest's file sizes; 1 MB = 1e6 B) / the median sync
  ``save()`` (write + fsync + CRC32 + publish). load MB/s: the same bytes / ``load()`` into a
  freshly built trainer, cold (the files' pages first evicted with posix_fadvise DONTNEED) and
  warm; ``find_resume_point`` (manifest sizes + CRC32 of every file) is timed apart, and the
  loaded weights are compared with the trainer's at save time.
* breakdown: mean ms per measured save of each timed piece; the unindented rows add up to the
  mean blocked time (``rest`` is barriers, all-reduces and glue).
* per rank: each rank's median blocked time; its host memory (resident set of the training
  process, sampled every 4 ms) at its peak during a save's blocking calls, and that peak minus
  the level just before the save ("above"), the same for the cold load into a fresh trainer,
  the process's lifetime maximum; and the bytes of the shard files it wrote (``__<rank>_*.distcp``
  of the last sync run's final checkpoint).

``--try-fixes [cache,clone]`` adds the variant ``async+fixes``: candidate
changes to kiln's save path, monkeypatched in for that variant only (see FIXES), and loads its
last checkpoint back to show it is still correct.

Results on the 2-core dev VM (cpu preset: 17.8M params, a 214 MB checkpoint with fp32 Adam
states; other jobs shared the 2 cores, load average 2-4, so steps varied 0.8-5 s between
identical steps): sync blocks 0.9-1.2 s per save (~180-230 MB/s: write + fsync 0.7-0.85 s,
CRC32 0.1 s); async blocks 0.13-0.19 s, a ratio of 0.115-0.20 across runs: it misses the 0.10
target.
On CPU the staging copy is free (the fork is the snapshot), so what stays on the training
thread is fixed overhead, not bytes:

* the fork of the writer (~50 ms: page tables of the whole ~1.5 GB trainer process, most of
  which is not checkpoint state);
* megatron's save path ~40-80 ms: DCP planning, the synchronous clone of CPU tensor views
  (SwiGLU fc1 is saved as two halves of params and both Adam moments: 75 MB of the 214 MB
  memcpy'd on every save, 10-50 ms), torch ShardedTensor translation (~15 ms),
  validate_sharding_integrity (~5 ms);
* the publishing poll ~15-30 ms: DCP .metadata, kiln's manifest/rename/latest, and retention's
  rmtree of the oldest checkpoint (~17 ms on the saves that delete one);
* kiln's sharded state (the engine's sharded_state_dict + the RNG object) + kiln.json (~8 ms).

The candidate fixes (cached plan, no re-validation, clone in the writer, plus background
retention) cut the mean by ~25-35 ms (ratio 0.09-0.14 across runs); what is left is mostly the
fork. Background retention is now in kiln, as is a torch-free initializer for the
writer-results server, which took the first save of a run from ~2 s to ~0.1-0.2 s. The background writer (torch.save, fsync,
CRC32 on the same 2 cores) slowed the overlapping training steps by about as much as a sync
save takes, so on this box async mostly moves the cost; with spare cores (a GPU node) it does not.

Each rank its own share (the distributed optimizer at dp=2; the command above with
``--preset cpu-large --distributed-optimizer``: 111.2M params, fp32, a 1779 MB checkpoint,
6 measured saves per variant; other agents' jobs kept the load average at 11-27 during both
runs, so times are rough, memory and bytes are not). Before, megatron-core's
``fully_reshardable`` all-gathered the whole optimizer state on both ranks inside kiln's
sharded state, and rank 0 wrote everything; after, each rank writes its own range of it
(kiln/engine/megatron_checkpoint.py), with no gather:

    per save: median (mean where said)    before: rank 0 / rank 1   after: rank 0 / rank 1
    blocked, sync                         26.6 s / 26.5 s           5.2 s / 5.2 s
    blocked, async                        14.2 s / 13.0 s           0.62 s / 0.54 s
    kiln's sharded state, sync / async    16.2 s / 12.5 s (mean)    0.02 s / 0.01 s (mean)
    host memory above pre-save, sync      2619 MB / 3181 MB         255 MB / 272 MB
    host memory above pre-save, async     2438 MB / 3181 MB         0 MB / 0 MB
    peak host memory in a save (max)      6809 MB / 5488 MB         2906 MB / 2905 MB
    bytes written                         1779.1 MB / 0 MB          889.6 MB / 889.5 MB
    cold load: host memory above          1274 MB / 2386 MB         443 MB / 423 MB
    cold load: time, peak host memory     11.8 s, 5974 / 5898 MB    4.4 s, 4109 / 4084 MB

(the 0.09 MB of metadata and common state are rank 0's in both). The async ratio is now
0.12, the fixed overheads above; the sync save is the two ranks' writes in parallel.

The portable format (``--engine deepspeed``: ZeRO-1, dp=2, ``--saves 2 --rounds 1``, a 1334 MB
checkpoint, same machine load). Before, a save all-reduced every parameter's whole master and
moments (each rank kept and wrote half of them) and a load read every whole value on every
rank; after, each rank saves and loads its own ZeRO fragments, in place:

    per save: median                      before: rank 0 / rank 1   after: rank 0 / rank 1
    blocked, sync                         9.7 s / 9.6 s             6.6 s / 6.6 s
    blocked, async                        2.28 s / 2.41 s           0.35 s / 0.29 s
    host memory above pre-save, sync      416 MB / 605 MB           294 MB / 183 MB
    host memory above pre-save, async     393 MB / 300 MB           0 MB / 0 MB
    bytes written                         667.2 MB / 667.1 MB       667.2 MB / 667.1 MB
    cold load: host memory above          1574 MB / 1381 MB         425 MB / 425 MB
    cold load: time, peak host memory     7.0 s, 5902 / 5783 MB     3.0 s, 4346 / 4538 MB
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    # ~18M params: a ~214 MB checkpoint with fp32 Adam states, a ~1 s step on 2 cores.
    "cpu": {"layers": 4, "hidden": 512, "heads": 8, "seq_len": 256, "micro_batch": 4, "precision": "fp32",
            "device": "cpu"},
    # ~109M params: a ~1.7 GB checkpoint with fp32 Adam states, large enough that gathering
    # the optimizer state shows in time and memory; short sequences keep a step at ~2 s on 2 cores.
    "cpu-large": {"layers": 8, "hidden": 1024, "heads": 16, "seq_len": 64, "micro_batch": 1, "precision": "fp32",
                  "device": "cpu"},
    "gpu": {"layers": 12, "hidden": 768, "heads": 12, "seq_len": 2048, "micro_batch": 8, "precision": "bf16",
            "device": "cuda"},
}

# Timed pieces of a save: (label, indent) in print order; the indent shows where a piece runs inside
# the row above. "rest" is the blocked time not inside any outermost timed piece.
BREAKDOWN = [
    ("wait for previous save", 0),
    ("writer-results server", 0),
    ("kiln.json (metadata)", 0),
    ("sharded_state (kiln)", 0),
    ("dist_checkpointing.save", 0),
    ("save_preprocess", 1),
    ("validate_sharding_integrity", 2),
    ("save_common (common.pt)", 1),
    ("async_save (translate+plan)", 1),
    ("plan (save_state_dict_async_plan)", 2),
    ("prepare_write_data", 3),
    ("schedule (stage + fork)", 0),
    ("execute_sync", 0),
    ("stage tensors (preload)", 1),
    ("write shards (+fsync)", 1),
    ("crc32 + sizes", 1),
    ("check done / join writer", 0),
    ("finalize: DCP .metadata", 0),
    ("retrieve write results", 1),
    ("metadata.json (megatron)", 0),
    ("publish (manifest, rename, latest, retention)", 0),
    ("retention delete", 1),
    ("rest (barriers, all-reduces, glue)", 0),
]


class RSSSampler:
    """Peak resident memory of this process during a call: a thread reads /proc/self/statm every
    few ms (gloo collectives and file writes release the GIL, so it samples during them too)."""

    def __init__(self, interval_s: float = 0.004) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def measure(self, fn, *args, **kwargs):
        """``fn(...)``'s result and (RSS before, peak RSS during) in bytes."""
        import threading

        base = self.rss()
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval_s):
                peak[0] = max(peak[0], self.rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            result = fn(*args, **kwargs)
        finally:
            stop.set()
            thread.join()
        return result, (base, max(peak[0], self.rss()))


class Recorder:
    """Times manager calls (events) and, inside them, the pieces they run (labels)."""

    def __init__(self) -> None:
        self.rss = RSSSampler()
        self.current: dict | None = None  # the event being recorded
        self.depth = 0  # nesting of timed pieces inside the current event
        self.events: list[dict] = []
        self.steps: list[dict] = []
        self.run = ""

    def event(self, kind: str, manager, fn, *args, **kwargs):
        before = manager.in_flight
        event = {"kind": kind, "run": self.run, "step": self.steps[-1]["step"] if self.steps else None,
                 "labels": {}, "in_flight_before": before,
                 "blocking": kwargs.get("blocking", False)}
        self.current = event
        start = time.monotonic()
        rss = (0, 0)
        try:
            result, rss = self.rss.measure(fn, *args, **kwargs)
            return result
        finally:
            event["rss_base"], event["rss_peak"] = rss
            event["start"], event["end"] = start, time.monotonic()
            event["total"] = event["end"] - start
            event["published"] = before is not None and manager.in_flight is None
            self.current = None
            self.events.append(event)

    def nested_wait(self, fn, *args, **kwargs):
        """save() waiting for the previous save: its pieces belong to that save, so keep them apart."""
        outer, self.current = self.current, {"labels": {}}
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            inner, self.current = self.current, outer
            outer["labels"]["wait for previous save"] = time.monotonic() - start
            outer["wait_labels"], outer["wait_top"] = inner["labels"], inner.get("top", 0.0)

    def label(self, name: str, fn, *args, **kwargs):
        self.depth += 1
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.depth -= 1
            if self.current is not None:
                took = time.monotonic() - start
                labels = self.current["labels"]
                labels[name] = labels.get(name, 0.0) + took
                if self.depth == 0:  # not inside another timed piece: counts toward the "rest" sum
                    self.current["top"] = self.current.get("top", 0.0) + took

    def wrap(self, owner, attr: str, name: str, static: bool = False) -> None:
        original = owner.__dict__[attr] if static else getattr(owner, attr)
        inner = original.__func__ if static else original

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            return self.label(name, inner, *args, **kwargs)

        setattr(owner, attr, staticmethod(timed) if static else timed)


FIXES = {
    "cache": "a persistent TorchDistSaveShardedStrategy(cached_metadata=True) (+ FullyParallelSaveStrategyWrapper "
             "when dp > 1) and validate_access_integrity=False after a run's first save",
    "clone": "no synchronous clone of CPU tensor views (the SwiGLU fc1 halves of params and Adam states) in "
             "prepare_write_data: the forked writer clones them from its copy-on-write snapshot",
}


class Fixes:
    """The variant `async+fixes`: candidate changes to kiln's save path, monkeypatched for that variant only."""

    def __init__(self, enabled: list[str]) -> None:
        self.enabled = set(enabled)
        self.dp_cp_group = None  # the run's data(+context)-parallel group, set once the run's groups exist
        self.active = False
        self.strategy = None
        self.saves = 0

    def reset(self, active: bool) -> None:
        self.active, self.strategy, self.saves = active, None, 0

    def on(self, fix: str) -> bool:
        return self.active and fix in self.enabled

    def save_kwargs(self) -> dict:
        if not self.on("cache"):
            return {}
        if self.strategy is None:
            from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
            from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

            self.strategy = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
            group = self.dp_cp_group
            if group.size() > 1:
                self.strategy = FullyParallelSaveStrategyWrapper(self.strategy, group, do_cache_distribution=True)
        self.saves += 1
        return {"sharded_strategy": self.strategy, "validate_access_integrity": self.saves == 1}


def _is_view(tensor) -> bool:
    return tensor.untyped_storage().size() != tensor.numel() * tensor.itemsize


def _fork_safe_clone(tensor):
    """A copy made without ATen's OpenMP kernels: in a forked child, libgomp's thread pool (the
    parent's) is gone and a parallel copy hangs in gomp_team_barrier_wait. numpy's copy is a memcpy."""
    import torch

    if not tensor.is_contiguous():
        return tensor.clone()
    raw = tensor.detach().reshape(-1).view(torch.uint8).numpy().copy()
    return torch.from_numpy(raw).view(tensor.dtype).reshape(tensor.shape)


def install_fixes(fixes: Fixes) -> None:
    """The fixes' monkeypatches; each is inert unless its fix is on for the running variant."""
    import shutil as _shutil
    import threading

    import torch
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch.overrides import TorchFunctionMode

    from kiln.checkpoint import store

    class NoCpuClone(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.clone and args[0].device.type == "cpu":
                return args[0]
            return func(*args, **(kwargs or {}))

    Writer = filesystem_async.FileSystemWriterAsync
    prepare = Writer.prepare_write_data

    def prepare_write_data(self, plan, planner):
        if not fixes.on("clone"):
            return prepare(self, plan, planner)
        with NoCpuClone():
            return prepare(self, plan, planner)

    Writer.prepare_write_data = prepare_write_data
    write_one = Writer.__dict__["write_preloaded_data"].__func__

    def write_preloaded_data(*args, **kwargs):
        # In the writer process: clone views (torch.save of a view writes its whole storage).
        file_name, storage_key, (bytes_data, tensor_data) = kwargs["write_bucket"]
        if any(_is_view(t) for _, t in tensor_data):
            tensor_data = [(item, _fork_safe_clone(t) if _is_view(t) else t) for item, t in tensor_data]
            kwargs["write_bucket"] = (file_name, storage_key, (bytes_data, tensor_data))
        return write_one(*args, **kwargs)

    Writer.write_preloaded_data = staticmethod(write_preloaded_data)


def instrument(rec: Recorder, fixes: Fixes, writer_log: Path, engine_cls) -> None:
    """Monkeypatch timers around the manager's calls and the megatron pieces they run."""
    import megatron.core.dist_checkpointing as dcp
    from megatron.core.dist_checkpointing import serialization, state_dict_utils
    from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async
    from megatron.core.dist_checkpointing.strategies import common as dcp_common
    from megatron.core.dist_checkpointing.strategies import torch as dcp_torch

    from kiln.checkpoint import manager as manager_mod
    from kiln.checkpoint import state as ckpt_state
    from kiln.checkpoint import store
    from kiln.parallel.megatron_compat import megatron_core_version

    Manager = manager_mod.CheckpointManager
    for kind in ("save", "poll", "wait"):
        original = getattr(Manager, kind)

        def call(self, *args, _kind=kind, _original=original, **kwargs):
            if rec.current is None:  # a call from the training loop: one event
                return rec.event(_kind, self, _original, self, *args, **kwargs)
            if _kind == "wait":
                return rec.nested_wait(_original, self, *args, **kwargs)
            return rec.label(f"nested {_kind}", _original, self, *args, **kwargs)

        setattr(Manager, kind, call)
    rec.wrap(Manager, "_ensure_writer_results_queue", "writer-results server")
    rec.wrap(Manager, "_publish", "publish (manifest, rename, latest, retention)")
    rec.wrap(ckpt_state, "kiln_metadata", "kiln.json (metadata)")
    rec.wrap(ckpt_state, "write_metadata", "kiln.json (metadata)")
    # The sharded state a save hands to dist_checkpointing: the engine's model + optimizer, and the RNG object.
    rec.wrap(engine_cls, "sharded_state_dict", "sharded_state (kiln)")
    rec.wrap(ckpt_state, "rng_sharded_object", "sharded_state (kiln)")
    rec.wrap(store, "describe_files", "crc32 + sizes")
    rec.wrap(store, "delete_checkpoint", "retention delete")

    save = dcp.save

    def dcp_save(*args, **kwargs):
        kwargs.update(fixes.save_kwargs())
        return rec.label("dist_checkpointing.save", save, *args, **kwargs)

    dcp.save = dcp_save
    rec.wrap(serialization, "save_preprocess", "save_preprocess")
    rec.wrap(state_dict_utils, "validate_sharding_integrity", "validate_sharding_integrity")
    if megatron_core_version() < (0, 17):
        rec.wrap(dcp_common.TorchCommonSaveStrategy, "save_common", "save_common (common.pt)")
        plan_module, write_shards = dcp_torch, "write_preloaded_data_multiproc"
    else:
        # 0.17 on: the async save looks its plan/finalize functions up in state_dict_saver at every
        # save, and writes shards from threads; 0.19 keeps the common state in the DCP files (no common.pt).
        from megatron.core.dist_checkpointing.strategies import state_dict_saver as plan_module

        write_shards = "write_preloaded_data_multithread"
        if megatron_core_version() < (0, 19):
            rec.wrap(serialization, "save_common", "save_common (common.pt)")
    rec.wrap(dcp_torch.TorchDistSaveShardedStrategy, "async_save", "async_save (translate+plan)")
    rec.wrap(plan_module, "save_state_dict_async_plan", "plan (save_state_dict_async_plan)")
    rec.wrap(plan_module, "save_state_dict_async_finalize", "finalize: DCP .metadata")
    Writer = filesystem_async.FileSystemWriterAsync
    rec.wrap(Writer, "prepare_write_data", "prepare_write_data")
    rec.wrap(Writer, "preload_tensors", "stage tensors (preload)", static=True)
    rec.wrap(Writer, write_shards, "write shards (+fsync)", static=True)
    rec.wrap(async_utils.AsyncCallsQueue, "schedule_async_request", "schedule (stage + fork)")
    rec.wrap(async_utils.TemporalAsyncCaller, "is_current_async_call_done", "check done / join writer")
    rec.wrap(Writer, "retrieve_write_results", "retrieve write results")
    rec.wrap(serialization, "save_config", "metadata.json (megatron)")
    rec.wrap(async_utils.AsyncRequest, "execute_sync", "execute_sync")

    # The writer (in the forked process when async) logs when it ran, for the background duration.
    with_file_record = manager_mod._with_file_record

    def timed_with_file_record(async_fn, directory, rank):
        write = with_file_record(async_fn, directory, rank)

        def timed_write(*args, **kwargs):
            start = time.monotonic()
            write(*args, **kwargs)
            end = time.monotonic()
            (writer_log / f"{Path(directory).name}.rank{rank}.{os.getpid()}.json").write_text(
                json.dumps({"dir": Path(directory).name, "rank": rank, "start": start, "end": end}))

        return timed_write

    manager_mod._with_file_record = timed_with_file_record


def build(config, ctx, checkpointer=None):
    """Trainer, built like kiln.train.run does (no callbacks, no preemption watcher)."""
    from kiln.data.setup import build_batches, build_val_batches
    from kiln.plan.flops import flops_per_token, peak_flops
    from kiln.train import build_run_engine
    from kiln.trainer.loop import Trainer

    batches, vocab_size = build_batches(config.data, config.train, config.model, ctx)
    engine = build_run_engine(config, ctx, vocab_size)
    trainer = Trainer(train=config.train, data=config.data, seq_len=config.model.seq_len, ctx=ctx, engine=engine,
                      batches=batches, callbacks=[], checkpoint_every=config.checkpoint.every,
                      checkpointer=checkpointer, val_batches=build_val_batches(config.data, config.train, ctx),
                      flops_per_token=flops_per_token(config.model, vocab_size), peak_flops=peak_flops(ctx.device))
    return trainer, vocab_size


def close_trainer(trainer) -> None:
    """What kiln.train.run closes after a run (the checkpoint manager is closed by its owner)."""
    trainer.close()
    trainer.batches.close()
    trainer.engine.close()


def manager_for(config, ctx, base: Path):
    from kiln.checkpoint.manager import CheckpointManager

    return CheckpointManager(config.checkpoint, ctx, base, config.model, config.to_dict())


def snapshot(trainer) -> dict:
    return {f"{i}.{k}": v.detach().to("cpu", copy=True) for i, m in enumerate(trainer.engine.model_parts)
            for k, v in m.state_dict().items() if hasattr(v, "detach")}


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def bytes_per_rank(directory: Path) -> dict[str, int]:
    """Bytes of a checkpoint by the rank that wrote them: DCP names each rank's shard files
    ``__<rank>_<n>.distcp``; the rest (DCP/megatron metadata, common.pt, kiln's files) is "common"."""
    import re

    written: dict[str, int] = {}
    for path in directory.iterdir():
        match = re.match(r"__(\d+)_", path.name)
        who = f"rank {match.group(1)}" if match else "common"
        written[who] = written.get(who, 0) + path.stat().st_size
    return dict(sorted(written.items()))


def evict_page_cache(directory: Path) -> None:
    """Drop the (fsynced, clean) pages of the checkpoint's files, so the next load reads the disk."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_variant(trainer, config, ctx, base: Path, name: str, round_index: int, steps: int, rec: Recorder,
                fixes: Fixes):
    """One training run of `steps` steps with its own CheckpointManager; returns its root."""
    from kiln.parallel import collectives

    run_config = copy.deepcopy(config)
    run_config.checkpoint.async_save = name != "sync"
    root = base / f"{name}-r{round_index}"
    run_config.checkpoint.dir = str(root)
    manager = manager_for(run_config, ctx, base)
    manager.prepare()
    fixes.reset(name == "async+fixes")
    rec.run = f"{name}/r{round_index}"
    trainer.checkpointer = manager
    trainer.train_config.max_steps = trainer.state.step + steps
    try:
        trainer.train()
    finally:
        manager.close()
        fixes.reset(False)
    collectives.barrier()
    return root


def _add(into: dict, labels: dict) -> None:
    for k, v in labels.items():
        into[k] = into.get(k, 0.0) + v


def analyse(rec: Recorder, writers: list[dict], name: str) -> dict:
    """Per-save blocked time and its breakdown for one variant (all its rounds)."""
    from kiln.checkpoint import store

    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    mean = lambda xs: statistics.fmean(xs) if xs else 0.0  # noqa: E731
    runs = sorted({e["run"] for e in rec.events if e["run"].startswith(name + "/")})
    measured, first, final, idle_polls, slowdown, bg_write, publish_lag, clean_all = [], [], [], [], [], [], [], []
    first_server, first_labels = [], []
    for run in runs:
        events = [e for e in rec.events if e["run"] == run]
        steps = [s for s in rec.steps if s["run"] == run]
        saves = {e["step"]: {"event": e, "labels": dict(e["labels"]), "publish": 0.0}
                 for e in rec.events if e["run"] == run and e["kind"] == "save"}
        for entry in saves.values():
            entry["labels"].pop("wait for previous save", None)  # charged to the save waited for
            entry["call"] = entry["event"]["total"] - entry["event"]["labels"].get("wait for previous save", 0.0)
            entry["top"] = entry["event"].get("top", 0.0)
        # Who published each save: a poll or wait from the loop, or the wait inside the next save.
        for e in events:
            owner = saves.get(e["in_flight_before"])
            if owner is None:
                continue
            if e["kind"] in ("poll", "wait") and e["published"]:
                owner["publish"] += e["total"]
                owner["top"] += e.get("top", 0.0)
                _add(owner["labels"], e["labels"])
            elif e["kind"] == "save" and "wait_labels" in e:
                waited = e["labels"]["wait for previous save"]
                owner["publish"] += waited
                _add(owner["labels"], e["wait_labels"])
                pure = waited - e["wait_top"]  # waiting for the writer, not finalizing/publishing
                _add(owner["labels"], {"wait for previous save": pure})
                owner["top"] += waited
        for step, entry in saves.items():
            entry["blocked"] = entry["call"] + entry["publish"]
            # Host memory: the peak above the level before the call, over the save() call and the
            # poll/wait that published it (what the training process holds while it blocks).
            blocking = [entry["event"]] + [e for e in events if e["kind"] in ("poll", "wait")
                                           and e["in_flight_before"] == step and e["published"]]
            entry["rss_delta"] = max(e["rss_peak"] - e["rss_base"] for e in blocking)
            entry["rss_peak"] = max(e["rss_peak"] for e in blocking)
            entry["labels"]["rest (barriers, all-reduces, glue)"] = entry["blocked"] - entry["top"]
        ordered = sorted(saves)
        first.append(saves[ordered[0]]["blocked"])
        first_server.append(saves[ordered[0]]["labels"].get("writer-results server", 0.0))
        first_labels.append(saves[ordered[0]]["labels"])
        final.append(saves[ordered[-1]]["blocked"])
        idle_polls.append(sum(e["total"] for e in events if e["kind"] == "poll" and not e["published"]) / len(saves))
        # Step-time method: wall time of the saving step (train + checkpoint work) minus the median
        # clean step, plus the publishing poll (the train part of that step overlaps the writer:
        # it is counted in the step slowdown instead).
        clean = [s["train"] + s["ckpt"] for s in steps if not s["overlap"] and s["ckpt_kind"] == "idle"]
        clean_all += [s["train"] for s in steps if not s["overlap"] and s["ckpt_kind"] == "idle"]
        base_step, base_train = med(clean), med([s["train"] for s in steps if not s["overlap"]])
        by_step = {s["step"]: s for s in steps}
        for step in ordered[1:-1]:
            entry = saves[step]
            saving = by_step[step]
            waited = entry["event"]["labels"].get("wait for previous save", 0.0)  # charged to the previous save
            entry["step_method"] = saving["train"] + saving["ckpt"] - waited - base_step + entry["publish"]
            measured.append(entry)
            w = [x for x in writers if x["dir"] == store.partial_dir_name(step)]
            if name == "sync" or not w:
                continue
            start, end = min(x["start"] for x in w), max(x["end"] for x in w)
            bg_write.append(end - start)
            pub = [e for e in events if e["in_flight_before"] == step and e["published"]]
            if pub:
                publish_lag.append(pub[0]["end"] - end)
            slowdown.append(sum(s["train"] - base_train for s in steps if s["t0"] < end and s["t1"] > start))
    return {
        "runs": len(runs),
        "measured_saves": len(measured),
        "blocked_s": med([s["blocked"] for s in measured]),
        "blocked_s_all": [s["blocked"] for s in measured],
        "save_call_s": med([s["call"] for s in measured]),
        "publish_s": med([s["publish"] for s in measured]),
        "step_method_s": med([s["step_method"] for s in measured]),
        "idle_polls_s_per_save": mean(idle_polls),
        "first_save_s": med(first),
        "final_save_s": med(final),
        "background_write_s": med(bg_write),
        "publish_lag_s": med(publish_lag),
        "step_slowdown_s_per_save": med(slowdown) if slowdown else 0.0,
        "clean_step_s": med(clean_all),
        "blocked_mean_s": mean([s["blocked"] for s in measured]),
        "save_rss_delta_mb": med([s["rss_delta"] / 2**20 for s in measured]),
        "save_rss_peak_mb": max([s["rss_peak"] / 2**20 for s in measured], default=float("nan")),
        "breakdown_s": {label: mean([s["labels"].get(label, 0.0) for s in measured]) for label, _ in BREAKDOWN},
        "first_save_server_s": med(first_server),
        "first_save_breakdown_s": {label: mean([f.get(label, 0.0) for f in first_labels]) for label, _ in BREAKDOWN},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="cpu (default without CUDA) or gpu")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--engine", choices=["megatron", "deepspeed", "fsdp"], default="megatron")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="megatron's distributed optimizer (optimizer state sharded over DP ranks)")
    parser.add_argument("--save-every", type=int, default=4, help="K: steps between saves (default 4)")
    parser.add_argument("--saves", type=int, default=3,
                        help="measured saves per run, besides the first and the final one (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs every variant once (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps first (default 2)")
    parser.add_argument("--try-fixes", nargs="?", const=",".join(FIXES), metavar="LIST",
                        help="also run the variant async+fixes with these candidate fixes to kiln's save path "
                             f"(comma-separated; default all: {', '.join(FIXES)})")
    parser.add_argument("--dir", help="keep the runs in a new directory under DIR (default: a temp dir, removed)")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--verbose", action="store_true", help="show kiln's log lines (each publish, the load)")
    args = parser.parse_args()
    fix_names = [f for f in (args.try_fixes or "").split(",") if f]
    unknown = set(fix_names) - set(FIXES)
    if unknown:
        parser.error(f"--try-fixes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FIXES)}")

    import logging

    from kiln.log import quiet_third_party, setup_logging

    quiet_third_party()  # before megatron-core is imported: it warns about optional kernels on import
    warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*")  # DCP via megatron, every save

    import torch

    from kiln.config import config_from_dict
    from kiln.engine import engine_class
    from kiln.parallel import collectives
    from kiln.parallel.backend import destroy_parallel, init_parallel

    preset = dict(PRESETS[args.preset or ("gpu" if torch.cuda.is_available() else "cpu")])
    for key in ("layers", "hidden", "heads", "seq_len", "micro_batch"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = config_from_dict({"name": "bench-checkpoint"}, [
        f"model.num_layers={preset['layers']}", f"model.hidden_size={preset['hidden']}",
        f"model.num_attention_heads={preset['heads']}", f"model.seq_len={preset['seq_len']}",
        f"train.micro_batch_size={preset['micro_batch']}", f"train.global_batch_size={preset['micro_batch'] * world}",
        f"train.precision={preset['precision']}", f"train.device={preset['device']}", "train.log_every=1000000",
        "optim.warmup_steps=0", "optim.schedule=constant", "logging.wandb=disabled",
        f"checkpoint.every={args.save_every}", f"parallel.engine={args.engine}",
        f"optim.distributed_optimizer={str(args.distributed_optimizer).lower()}"])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    setup_logging(ctx.rank)
    if not args.verbose:
        logging.getLogger("kiln").setLevel(logging.WARNING)
    if ctx.rank == 0 and args.dir:
        os.makedirs(args.dir, exist_ok=True)
    base = Path(collectives.broadcast_object(
        tempfile.mkdtemp(prefix="kiln-bench-ckpt-", dir=args.dir) if ctx.rank == 0 else None))
    writer_log = base / "writer-times"
    if ctx.rank == 0:
        writer_log.mkdir(parents=True, exist_ok=True)
    config.train.run_dir = str(base)
    collectives.barrier()

    rec, fixes = Recorder(), Fixes(fix_names)
    fixes.dp_cp_group = ctx.pg_collection.dp_cp
    install_fixes(fixes)
    instrument(rec, fixes, writer_log, engine_class(config.parallel.engine))
    trainer, vocab_size = build(config, ctx)
    n_params = sum(p.numel() for m in trainer.engine.model_parts for p in m.parameters())

    # Per-step record: train-step time (the engine's forward/backward through its optimizer step),
    # checkpoint work after it, and overlap with a background write.
    engine = trainer.engine
    forward_backward, optimizer_step, after_step = engine.forward_backward, engine.optimizer_step, \
        trainer._checkpoint_after_step
    step_started = [0.0]

    def timed_forward_backward(micro_batches):
        step_started[0] = time.monotonic()
        return forward_backward(micro_batches)

    def timed_optimizer_step(result, skip=False):
        out = optimizer_step(result, skip=skip)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = step_started[0]
        rec.steps.append({"run": rec.run, "step": trainer.state.step + 1, "t0": t0, "t1": time.monotonic(),
                          "train": time.monotonic() - t0, "overlap": trainer.checkpointer.in_flight is not None})
        return out

    def timed_after_step():
        before, n_events = trainer.checkpointer.in_flight, len(rec.events)
        t0 = time.monotonic()
        after_step()
        entry = rec.steps[-1]
        entry["ckpt"] = time.monotonic() - t0
        kinds = {e["kind"] for e in rec.events[n_events:]}
        published = before is not None and trainer.checkpointer.in_flight is None and "save" not in kinds
        entry["ckpt_kind"] = "save" if "save" in kinds else ("publish" if published else "idle")
        if published:
            entry["published"] = before

    for _ in range(args.warmup):
        trainer.train_step()  # untimed: before the timed calls below go in
    engine.forward_backward, engine.optimizer_step = timed_forward_backward, timed_optimizer_step
    trainer._checkpoint_after_step = timed_after_step

    variants = ["sync", "async"] + (["async+fixes"] if fix_names else [])
    steps_per_run = args.save_every * (args.saves + 2)  # first + measured + the final (blocking) save
    roots: dict[str, list[Path]] = {v: [] for v in variants}
    weights_at_end: dict[str, dict] = {}
    started, load_before = time.monotonic(), os.getloadavg()[0]
    for round_index in range(args.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for name in order:
            root = run_variant(trainer, config, ctx, base, name, round_index, steps_per_run, rec, fixes)
            roots[name].append(root)
            if round_index == args.rounds - 1 and name != "async":  # loaded back below
                weights_at_end[f"{name}/r{round_index}"] = snapshot(trainer)
            elif ctx.rank == 0 and not args.dir:  # free the disk (3 checkpoints a run are kept)
                shutil.rmtree(root, ignore_errors=True)
    train_wall, load_after = time.monotonic() - started, os.getloadavg()[0]

    # Step numbers go on across runs, so a writer's directory name (.step_N.partial) names its save.
    writers = [json.loads(path.read_text()) for path in writer_log.glob("*.json")] if ctx.rank == 0 else []

    results = {name: analyse(rec, writers, name) for name in variants}

    # Load: a fresh trainer, the last sync run's final checkpoint (and async+fixes', for correctness).
    from kiln.checkpoint import store

    def load_from(root: Path, label: str) -> dict:
        load_config = copy.deepcopy(config)
        load_config.checkpoint.dir = str(root)
        manager = manager_for(load_config, ctx, base)
        fresh, _ = build(load_config, ctx, manager)
        t0 = time.monotonic()
        path = manager.find_resume_point()
        verify_s = time.monotonic() - t0
        manifest = store.read_manifest(path)
        nbytes = sum(f["size"] for f in manifest["files"].values())
        if ctx.rank == 0:
            evict_page_cache(path)
        collectives.barrier()
        t0 = time.monotonic()
        _, (rss_base, rss_peak) = rec.rss.measure(manager.load, path, fresh.engine, fresh.checkpoint_parts())
        cold_s = time.monotonic() - t0
        t0 = time.monotonic()
        manager.load(path, fresh.engine, fresh.checkpoint_parts())
        warm_s = time.monotonic() - t0
        ok = same_weights(snapshot(fresh), weights_at_end[label])
        manager.close()
        close_trainer(fresh)
        return {"path": str(path), "bytes": nbytes, "files": len(manifest["files"]), "verify_s": verify_s,
                "load_cold_s": cold_s, "load_warm_s": warm_s, "weights_match": ok,
                "load_rss_delta_mb": (rss_peak - rss_base) / 2**20, "load_rss_peak_mb": rss_peak / 2**20,
                "written": bytes_per_rank(path) if ctx.rank == 0 else {}}

    last_round = args.rounds - 1
    load = load_from(roots["sync"][-1], f"sync/r{last_round}")
    fixes_load = load_from(roots["async+fixes"][-1], f"async+fixes/r{last_round}") if fix_names else None

    # Every rank's own numbers: blocking time and host memory differ between DP ranks when one
    # of them gathers or writes more than the others.
    import resource

    per_rank = collectives.all_gather_object({
        "rank": ctx.rank, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        "load_rss_delta_mb": load["load_rss_delta_mb"], "load_rss_peak_mb": load["load_rss_peak_mb"],
        **{name: {k: results[name][k] for k in ("blocked_s", "save_rss_delta_mb", "save_rss_peak_mb")}
           for name in variants}})
    sync, asyn = results["sync"], results["async"]
    ratio = asyn["blocked_s"] / sync["blocked_s"]
    mb = load["bytes"] / 1e6
    save_mbps = mb / sync["blocked_s"]
    load_mbps = mb / load["load_cold_s"]
    if ctx.rank == 0:
        device = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "CPU emulation, gloo"
        print(f"\ndevice {ctx.device.type} ({device}), {ctx.layout.world_size} process(es), "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs; "
              f"{preset['layers']} layers × {preset['hidden']}, seq {preset['seq_len']}, micro-batch "
              f"{preset['micro_batch']}, {preset['precision']}, vocab {vocab_size}: {n_params / 1e6:.1f}M params; "
              f"engine {engine.describe(config.parallel)}"
              f"{' with the distributed optimizer' if args.distributed_optimizer else ''}, dp={ctx.layout.dp}")
        print(f"checkpoint {mb:.1f} MB in {load['files']} files; save every {args.save_every} steps, "
              f"{steps_per_run} steps per run, {args.rounds} rounds × {len(variants)} variants "
              f"(order alternating), {train_wall:.0f}s; median clean train step {sync['clean_step_s'] * 1e3:.0f} ms")
        print(f"machine load average (1 min) {load_before:.1f} before the runs, {load_after:.1f} after "
              f"(above the {os.cpu_count()} CPUs means other processes competed with the bench)")
        print()
        head = (f"{'variant':<12} {'saves':>5} {'blocked':>9} {'save()':>9} {'publish':>9} {'step-time':>9} "
                f"{'idle poll':>9} {'bg write':>9} {'pub. lag':>9} {'step slow':>9} {'1st save':>9} {'final':>9}")
        print(head)
        print(f"{'':<12} {'':>5} {'ms/save':>9} {'ms':>9} {'poll ms':>9} {'method ms':>9} {'ms/save':>9} "
              f"{'s':>9} {'s':>9} {'ms/save':>9} {'ms':>9} {'ms':>9}")
        for name in variants:
            r = results[name]
            print(f"{name:<12} {r['measured_saves']:>5} {r['blocked_s'] * 1e3:>9.1f} {r['save_call_s'] * 1e3:>9.1f} "
                  f"{r['publish_s'] * 1e3:>9.1f} {r['step_method_s'] * 1e3:>9.1f} "
                  f"{r['idle_polls_s_per_save'] * 1e3:>9.2f} {r['background_write_s']:>9.2f} "
                  f"{r['publish_lag_s']:>9.2f} {r['step_slowdown_s_per_save'] * 1e3:>9.0f} "
                  f"{r['first_save_s'] * 1e3:>9.0f} {r['final_save_s'] * 1e3:>9.0f}")
        print("(blocked = save() + the poll/wait that publishes it, median over measured saves; "
              "step-time method = step time of save/publish steps − median clean step)")
        print()
        print("breakdown, mean ms per measured save (inclusive: indented rows are inside the row above; for sync "
              "the finalize/publish rows run inside execute_sync; the unindented rows add up to the mean):")
        print(f"  {'':<50}" + "".join(f"{name:>12}" for name in variants))
        print(f"  {'blocked (mean)':<50}" + "".join(f"{results[n]['blocked_mean_s'] * 1e3:>12.1f}" for n in variants))
        for label, depth in BREAKDOWN:
            values = [results[name]["breakdown_s"][label] for name in variants]
            if all(v < 5e-5 for v in values):
                continue
            print(f"  {'  ' * depth + label:<50}" + "".join(f"{v * 1e3:>12.1f}" for v in values))
        print()
        print("first save of a run (not in the medians): " + ", ".join(
            f"{n} {results[n]['first_save_s'] * 1e3:.0f} ms (starting the writer-results server "
            f"{results[n]['first_save_server_s'] * 1e3:.0f} ms)" for n in variants))
        for name in variants[1:]:
            print(f"ratio {name}/sync blocked (median): {results[name]['blocked_s'] / sync['blocked_s']:.3f}")
        print(f"load {load['path']}: verify (sizes + CRC32) {load['verify_s'] * 1e3:.0f} ms; "
              f"load cold {load['load_cold_s'] * 1e3:.0f} ms ({mb / load['load_cold_s']:.0f} MB/s), "
              f"warm {load['load_warm_s'] * 1e3:.0f} ms ({mb / load['load_warm_s']:.0f} MB/s); "
              f"weights match the trainer's at save time: {load['weights_match']}")
        print()
        print("per rank (host memory: the training process's resident set; 'above' = the peak during the save's "
              "blocking calls, or the load, minus the level just before):")
        print(f"  {'rank':<6}" + "".join(f"{name + ' blocked ms':>20}{name + ' above MB':>18}{name + ' peak MB':>17}"
                                         for name in variants) + f"{'load above MB':>15}{'load peak MB':>14}"
              f"{'max RSS MB':>12}{'written MB':>12}")
        for r in per_rank:
            written = load["written"].get(f"rank {r['rank']}", 0) / 1e6
            print(f"  {r['rank']:<6}" + "".join(f"{r[n]['blocked_s'] * 1e3:>20.0f}{r[n]['save_rss_delta_mb']:>18.0f}"
                                                 f"{r[n]['save_rss_peak_mb']:>17.0f}" for n in variants)
                  + f"{r['load_rss_delta_mb']:>15.0f}{r['load_rss_peak_mb']:>14.0f}{r['max_rss_mb']:>12.0f}"
                  f"{written:>12.1f}")
        print(f"  written by no rank in particular (metadata, common.pt, kiln files): "
              f"{load['written'].get('common', 0) / 1e6:.2f} MB (bytes of {Path(load['path']).name} of the last sync run)")
        if fixes_load is not None:
            print(f"async+fixes ({', '.join(fix_names)}): its last checkpoint ({fixes_load['bytes'] / 1e6:.1f} MB) "
                  f"loads back, weights match: {fixes_load['weights_match']}")
        print(f"async blocks {asyn['blocked_s'] * 1e3:.1f} ms/save vs sync {sync['blocked_s'] * 1e3:.1f} ms/save: "
              f"ratio {ratio:.3f} (target <= 0.10); save {save_mbps:.0f} MB/s, load {load_mbps:.0f} MB/s")
        if args.json:
            out = {"device": ctx.device.type, "world_size": ctx.layout.world_size, "model": preset,
                   "params": n_params, "save_every": args.save_every, "steps_per_run": steps_per_run,
                   "rounds": args.rounds, "loadavg": [load_before, load_after], "checkpoint_bytes": load["bytes"],
                   "variants": results,
                   "ratio_async_sync": ratio, "save_mb_s": save_mbps, "load_mb_s": load_mbps, "load": load,
                   "fixes": fix_names, "fixes_load": fixes_load, "per_rank": per_rank,
                   "steps": [{k: v for k, v in st.items() if k not in ("t0", "t1")} for st in rec.steps]}
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    close_trainer(trainer)
    collectives.barrier()
    if ctx.rank == 0 and not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
