"""Run a test function on N gloo ranks, in-process style (spawned workers, no CLI, no torchrun).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes, makes each a
rank of one gloo world (``torch.distributed`` env vars; ``kiln.parallel.backend.init_parallel``
joins it), calls ``fn(rank, *args)`` and returns every rank's return value, in rank order. A
failure on any rank raises with that rank's traceback. ``fn`` must be importable (a module-level
function of a test module), and what it returns must pickle.

``exit_codes_of_ranks(fn, world_size, *args)`` is for code that ends its process itself
(``os._exit``): it returns each rank's exit code instead (an exception in ``fn`` gives 1).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from typing import Any, Callable

from kiln.parallel.backend import free_port


def _join_world(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1", WANDB_SILENT="true")
    from kiln.log import quiet_third_party

    quiet_third_party()


def _worker(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    try:
        _join_world(rank, world_size, port)
        results.put((rank, True, fn(rank, *args)))
    except BaseException:  # the parent re-raises it with this rank's traceback
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300) -> list[Any]:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [context.Process(target=_worker, args=(fn, rank, world_size, port, args, results))
               for rank in range(world_size)]
    for worker in workers:
        worker.start()
    outcomes: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout_s)
            if not ok:
                raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
            outcomes[rank] = value
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    return [outcomes[rank] for rank in range(world_size)]


def _exiting_worker(fn: Callable, rank: int, world_size: int, port: int, args: tuple) -> None:
    _join_world(rank, world_size, port)
    fn(rank, *args)  # an exception ends the process with code 1 and its traceback on stderr


def exit_codes_of_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300) -> list[int | None]:
    """Every rank's exit code, in rank order; None for a rank still running after ``timeout_s`` (killed)."""
    context = mp.get_context("spawn")
    port = free_port()
    workers = [context.Process(target=_exiting_worker, args=(fn, rank, world_size, port, args))
               for rank in range(world_size)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = []
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
        codes.append(worker.exitcode)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    return codes
