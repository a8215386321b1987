"""Save and load sharded checkpoints: async writes, atomic publish, verified resume.

A save (collective, every rank):

1. rank 0 makes ``.step_N.partial/`` and writes ``kiln.json``;
2. megatron-core ``dist_checkpointing`` writes the torch DCP shards. With ``checkpoint.async``
   the write runs in a forked process (a copy-on-write snapshot of this step's tensors, staged
   to host memory first on GPUs) while training goes on; each writer also records its files'
   sizes and CRC32s, so hashing never blocks training;
3. once every rank's writer is done (checked without blocking after each step), rank 0
   writes the manifest, renames the directory to ``step_N/``, moves ``latest``, and applies
   retention. Only one save is in flight at a time.

A crash at any point leaves at worst a ``.partial`` directory, which is never loaded.
Loading verifies the manifest (the files split over all ranks) and falls back to the
previous checkpoint, with a warning naming the bad one, which is moved aside, not deleted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from kiln.checkpoint import state as ckpt_state
from kiln.checkpoint import store
from kiln.checkpoint.helpers import quiet_helper_process
from kiln.config import CheckpointConfig, ModelConfig
from kiln.errors import KilnCheckpointError
from kiln.parallel import collectives
from kiln.parallel.megatron_compat import async_save_kwargs, check_can_read_checkpoint

log = logging.getLogger("kiln")

_RANK_PIECE = ".kiln-files-rank{rank}.json"


def check_resume_settings(checkpoint: CheckpointConfig, run_dir: str | None, engine_cls) -> None:
    """Before any process starts: the resume settings must make sense for what is on disk, and
    the engine must be able to read the checkpoint it would resume from."""
    root = Path(checkpoint.dir) if checkpoint.dir else (Path(run_dir) / "checkpoints" if run_dir else None)
    own = store.published_steps(root) if root is not None else []
    if own and not checkpoint.resume:
        raise KilnCheckpointError(_mixing_runs_message(root, own))
    source = checkpoint.resume_from
    if source and not own and not Path(source).exists():
        raise KilnCheckpointError(f"checkpoint.resume_from={source}: no such file or directory")
    if own:
        candidate = root / store.step_dir_name(own[-1])
    elif source and (Path(source) / ckpt_state.KILN_META).exists():
        candidate = Path(source)
    elif source and store.published_steps(Path(source)):
        candidate = Path(source) / store.step_dir_name(store.published_steps(Path(source))[-1])
    else:
        return
    try:
        meta = ckpt_state.read_metadata(candidate)
        engine = meta["engine"]
    except (KilnCheckpointError, ValueError, KeyError):
        return  # unreadable: the verified resume in the workers names the problem and falls back
    engine_cls.check_can_load(engine["name"], engine["checkpoint_format"], candidate)
    check_can_read_checkpoint(meta.get("versions", {}).get("megatron-core", "unknown"), candidate)


def _mixing_runs_message(root: Path, own: list[int]) -> str:
    return (f"checkpoint.resume=false (--no-resume) but {root} already holds checkpoints "
            f"({store.step_dir_name(own[-1])} is the newest); starting over there would mix two runs. "
            f"Use a new train.run_dir (or checkpoint.dir), or remove {root}")


class CheckpointManager:
    def __init__(self, checkpoint: CheckpointConfig, ctx, run_dir: Path, model: ModelConfig,
                 run_config: dict[str, Any]) -> None:
        self.cfg = checkpoint
        self.ctx = ctx
        self.model_config, self.run_config = model, run_config
        self.rng = ckpt_state.RNGState(ctx.device)
        self._published: list[int] = []  # steps published since the trainer last asked
        self.root = Path(self.cfg.dir) if self.cfg.dir else Path(run_dir) / "checkpoints"
        self.in_flight: int | None = None  # step being written in the background
        self.last_saved_step: int | None = None
        self.blocked_s: list[float] = []  # how long training waited, per save
        self._queue = None
        self._results_server = None

    @property
    def rank(self) -> int:
        return self.ctx.rank

    # -- startup ------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the directory and clear saves a crashed run left half-written (collective)."""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for path in store.remove_stale_partials(self.root):
                log.warning(f"removed {path.name}: a checkpoint save that never finished")
        collectives.barrier()

    def find_resume_point(self) -> Path | None:
        """The checkpoint this run starts from, or None (collective; every rank agrees).

        Own checkpoints (``checkpoint.dir``) win over ``checkpoint.resume_from``: after a restart
        the run's own progress is newer than where it started.
        """
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        own = store.published_steps(self.root)
        if own and not self.cfg.resume and not restarted:
            raise KilnCheckpointError(_mixing_runs_message(self.root, own))
        if own and (self.cfg.resume or restarted):
            found = self._first_good([self.root / store.step_dir_name(s) for s in store.resume_candidates(self.root)],
                                     move_bad_aside=True)
            if found is None:
                raise KilnCheckpointError(
                    f"none of the {len(own)} checkpoint(s) in {self.root} is complete and intact (see the warnings "
                    f"above); move them away to start over, or pass --resume-from with a good one")
            return found
        if self.cfg.resume_from:
            return self._resolve_explicit(Path(self.cfg.resume_from))
        return None

    def _resolve_explicit(self, path: Path) -> Path:
        if (path / store.MANIFEST).exists() or store.parse_step(path.name) is not None:
            found = self._first_good([path], move_bad_aside=False)
        else:  # a checkpoint directory: its newest good step
            found = self._first_good([path / store.step_dir_name(s) for s in store.resume_candidates(path)],
                                     move_bad_aside=False)
        if found is None:
            raise KilnCheckpointError(f"--resume-from {path}: no complete, intact checkpoint there (see the warnings)")
        return found

    def _first_good(self, candidates: list[Path], move_bad_aside: bool) -> Path | None:
        """The first candidate whose manifest verifies; bad ones get a warning naming them."""
        for index, path in enumerate(candidates):
            verdict = self.verify(path)
            if verdict.ok:
                return path
            if self.rank == 0:
                after = "trying the previous one" if index + 1 < len(candidates) else "no older checkpoint to try"
                log.warning(f"checkpoint {path} is unusable: {verdict.reason}; {after}")
                if move_bad_aside:
                    _move_aside(path)
            collectives.barrier()
        return None

    def verify(self, path: Path) -> store.Verdict:
        """Manifest check with the files split over every rank (collective)."""
        manifest, verdict = store.check_manifest(path)
        if manifest is not None:
            names = sorted(manifest["files"])
            world, rank = collectives.world_size(), collectives.rank()
            verdict = store.verify_files(path, names[rank::world], manifest, self.cfg.verify_checksums)
        verdicts = collectives.all_gather_object((verdict.ok, verdict.reason))
        bad = [reason for ok, reason in verdicts if not ok]
        return store.Verdict(not bad, bad[0] if bad else "")

    def latest(self) -> Path | None:
        """The newest published checkpoint, or None."""
        steps = store.published_steps(self.root)
        return self.root / store.step_dir_name(steps[-1]) if steps else None

    # -- load ---------------------------------------------------------------------------
    def load(self, path: Path, engine, parts: dict[str, Any]) -> dict[str, Any]:
        """Load the engine's model and optimizer, the RNG states and every part (collective)."""
        from megatron.core import dist_checkpointing

        from kiln.engine.base import SavedEngine

        meta = ckpt_state.read_metadata(path)
        ckpt_state.check_architecture(meta, self.model_config, path)
        saved = SavedEngine(name=meta["engine"]["name"], checkpoint_format=meta["engine"]["checkpoint_format"],
                            state=meta["engine"]["state"], step=int(meta["step"]),
                            tensor_keys=ckpt_state.tensor_keys(path))
        engine.check_can_load(saved.name, saved.checkpoint_format, path)
        check_can_read_checkpoint(meta.get("versions", {}).get("megatron-core", "unknown"), path)
        # RNG states belong to (pp, tp, cp) positions; under another layout they mean nothing.
        with_rng = ckpt_state.same_rng_layout(meta, self.ctx.layout)
        started = time.perf_counter()
        sharded = engine.sharded_state_dict(is_loading=True, saved=saved)
        if with_rng:
            sharded["rng"] = ckpt_state.rng_sharded_object(self.rng, self.ctx.layout, self.ctx.coords, is_loading=True)
        loaded = dist_checkpointing.load(sharded, str(path))
        engine.load_sharded_state_dict(loaded, saved)
        engine.load_state_dict(saved.state)
        if with_rng:
            self.rng.load_state_dict(loaded["rng"])
        ckpt_state.load_parts(parts, meta)
        self.last_saved_step = saved.step
        if self.rank == 0:
            layout = meta["layout"]
            log.info(f"resumed from {path} (step {saved.step}, saved by the {saved.name} engine with tp={layout['tp']} "
                     f"pp={layout['pp']} dp={layout['dp']}) in {time.perf_counter() - started:.1f}s"
                     + ("" if with_rng else "; layout changed, so RNG states start fresh")
                     + (f"; weights imported from {meta['imported']['from']}, data from its first sample"
                        if meta.get("imported") else ""))
        return meta

    # -- save ---------------------------------------------------------------------------
    def save(self, step: int, engine, parts: dict[str, Any], *, blocking: bool = False,
             extra_meta: dict[str, Any] | None = None) -> None:
        """Checkpoint the engine and every part at ``step`` (collective); ``extra_meta`` goes into kiln.json."""
        from megatron.core import dist_checkpointing

        started = time.perf_counter()
        self.wait()  # one save at a time: never two writers, never retention during a write
        self._ensure_writer_results_queue()
        partial = self.root / store.partial_dir_name(step)
        if self.rank == 0:
            store.remove_stale_partials(self.root)
            partial.mkdir(parents=True)
            ckpt_state.write_metadata(partial, ckpt_state.kiln_metadata(engine, parts, self.ctx.layout,
                                                                         self.run_config, extra_meta))
        collectives.barrier()
        sharded = engine.sharded_state_dict(is_loading=False)
        sharded["rng"] = ckpt_state.rng_sharded_object(self.rng, self.ctx.layout, self.ctx.coords, is_loading=False)
        request = dist_checkpointing.save(sharded, str(partial), async_sharded_save=True, **async_save_kwargs())
        request = request._replace(async_fn=_with_file_record(request.async_fn, partial, self.rank))
        request.add_finalize_fn(functools.partial(self._publish, step))
        if self.cfg.async_save and not blocking:
            self._async_queue().schedule_async_request(request)
            self.in_flight = step
        else:
            request.execute_sync()
        self.blocked_s.append(time.perf_counter() - started)

    def poll(self) -> list[int]:
        """Publish a finished background save; returns at once otherwise (collective).
        Returns the steps published since the last poll or wait."""
        if self.in_flight is not None:
            if self._queue.maybe_finalize_async_calls(blocking=False):
                self.in_flight = None
        return self._take_published()

    def wait(self) -> list[int]:
        """Block until the background save (if any) is published (collective); the steps published."""
        if self.in_flight is not None:
            started = time.perf_counter()
            self._queue.maybe_finalize_async_calls(blocking=True)
            self.in_flight = None
            if self.rank == 0:
                log.debug(f"waited {time.perf_counter() - started:.2f}s for the previous checkpoint")
        return self._take_published()

    def _take_published(self) -> list[int]:
        published, self._published = self._published, []
        return published

    def close(self) -> None:
        self.wait()
        if self._queue is not None:
            self._queue.close()
        if self._results_server is not None:
            from megatron.core.dist_checkpointing.strategies import filesystem_async

            filesystem_async._results_queue = None
            self._results_server.shutdown()

    def _ensure_writer_results_queue(self) -> None:
        """Start the queue megatron's writers report through, immune to stop signals.

        megatron-core creates it lazily in a spawned server process that dies on the SIGTERM
        torchrun sends to the worker's whole process group, which would lose the very save the
        signal asks for. kiln starts that server itself, ignoring SIGTERM/SIGUSR1 and dying
        with the worker, and hands it to megatron (``filesystem_async._results_queue``).
        """
        import multiprocessing as mp
        from multiprocessing.managers import SyncManager

        from megatron.core.dist_checkpointing.strategies import filesystem_async

        if filesystem_async._results_queue is None:
            server = SyncManager(ctx=mp.get_context("spawn"))
            # A stop signal sent to the whole process group while the spawned server is still starting
            # (before its initializer ignores it) would kill it: the signal save itself starts it. The
            # child inherits these signals blocked and never unblocks them; here they arrive after.
            stop_signals = {signal.SIGTERM, signal.SIGUSR1}
            unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
            try:
                server.start(initializer=quiet_helper_process)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
            self._results_server = server
            filesystem_async._results_queue = server.Queue()

    def _async_queue(self):
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()
        return self._queue

    def _publish(self, step: int) -> None:
        """Manifest, rename, ``latest``, retention: rank 0 after every writer finished."""
        if self.rank == 0:
            try:
                self._publish_on_rank0(step)
                self.last_saved_step = step
            except Exception as err:  # a failed publish must not kill training: the last good one stays
                log.error(f"checkpoint step {step} was NOT published ({type(err).__name__}: {err}); "
                          f"the previous checkpoint stays the latest")
        collectives.barrier()  # nobody exits or saves again before the checkpoint is published
        if self.rank != 0:
            self.last_saved_step = step
        self._published.append(step)

    def _publish_on_rank0(self, step: int) -> None:
        partial = self.root / store.partial_dir_name(step)
        files: dict[str, dict[str, int]] = {}
        pieces = sorted(partial.glob(_RANK_PIECE.format(rank="*")))
        for piece in pieces:
            files.update(json.loads(piece.read_text()))
            piece.unlink()
        rest = sorted(p.name for p in partial.iterdir() if p.is_file() and p.name not in files)
        files.update(store.describe_files(partial, rest))
        store.write_manifest(partial, step, files)
        final = store.publish(self.root, step)
        total = sum(f["size"] for f in files.values())
        log.info(f"checkpoint {final} ({total / 2**20:.1f} MiB, {len(files)} files)")
        doomed = store.steps_to_delete(store.published_steps(self.root), self.cfg.keep_last, self.cfg.keep_every,
                                       protect={step})
        for old in doomed:
            store.delete_checkpoint(self.root, old, in_background=True)
        if doomed:
            log.info(f"retention: removed {', '.join(store.step_dir_name(s) for s in doomed)}")


def _with_file_record(async_fn, directory: Path, rank: int):
    """Wrap megatron's writer: afterwards, record this rank's files (size, CRC32) beside them.

    Runs where the writer runs (the forked background process when saving async), so the
    hashing costs training nothing. A background writer finishes its save through a stop
    signal (its trainer waits for it) and dies with its trainer (see quiet_helper_process).
    """
    parent = os.getpid()

    def write_and_record(*args, **kwargs):
        if os.getpid() != parent:
            quiet_helper_process()
        if async_fn is not None:
            async_fn(*args, **kwargs)
        names = sorted(p.name for p in directory.glob(f"__{rank}_*"))
        record = store.describe_files(directory, names)
        piece = directory / _RANK_PIECE.format(rank=rank)
        piece.write_text(json.dumps(record))

    return write_and_record


def _move_aside(path: Path) -> None:
    """Rename a bad checkpoint so it is never tried again but stays for inspection."""
    target = path.with_name(f".{path.name}.corrupt")
    suffix = 1
    while target.exists():
        target = path.with_name(f".{path.name}.corrupt{suffix}")
        suffix += 1
    try:
        os.rename(path, target)
        log.warning(f"moved {path.name} to {target.name} (kept for inspection; delete it when done)")
    except OSError as err:
        log.warning(f"could not move {path} aside: {err}")
