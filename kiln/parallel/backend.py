"""Process groups and the device backend: CUDA/NCCL on GPUs, CPU/gloo emulation elsewhere.

This is the one module that talks to megatron-core's ``parallel_state``; everything else in
kiln receives the groups it needs from :class:`ParallelContext`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from kiln.errors import KilnEnvironmentError
from kiln.parallel import collectives
from kiln.parallel.layout import MEGATRON_ORDER, ParallelLayout

log = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    """What a rank needs to know about the parallel world it lives in."""

    layout: ParallelLayout
    rank: int
    local_rank: int
    device: torch.device
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection

    @property
    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)


def resolve_device(requested: str) -> str:
    """'auto' → 'cuda' if a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if requested == "cuda" and not has_cuda:
        raise KilnEnvironmentError(
            "train.device=cuda but no CUDA device is visible; use train.device=cpu (or auto) to run on CPU"
        )
    return requested


def worker_environment(parallel, device: str, run_dir: str | None = None) -> dict[str, str]:
    """Environment the training processes need before CUDA starts in them (the launcher sets it).

    * ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with tensor or context parallelism: one hardware queue
      makes kernels start in the order they were issued, which megatron-core relies on to run
      a TP/CP collective concurrently with the GEMM issued after it (Megatron-LM sets it too).
      FSDP-style overlap wants several queues, so it is not forced otherwise.
    * ``CUDA_VISIBLE_DEVICES=""`` for ``train.device=cpu``: a rehearsal on a GPU login node never
      touches (or allocates memory on) the GPUs.
    * NCCL's flight recorder on, written to ``<run_dir>/logs`` when a collective times out
      (:func:`kiln.trainer.watchdog.flight_recorder_environment`; what the user set is kept).
    """
    env: dict[str, str] = {}
    if device != "cpu" and (parallel.tp > 1 or parallel.cp > 1):
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        from kiln.trainer.watchdog import flight_recorder_environment

        env.update(flight_recorder_environment(run_dir))
    return env


def init_parallel(device: str, seed: int, layout_for: Callable[[int], ParallelLayout]) -> ParallelContext:
    """Join (or create) the process group, build megatron-core's groups, seed every RNG.

    ``device`` is train.device; ``layout_for(world_size)`` validates the layout on the world found.
    """
    device_type = resolve_device(device)
    if device_type == "cpu":
        from kiln.parallel import cpu_emulation

        cpu_emulation.install()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # before NCCL init, so each rank's communicator binds its own GPU
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        _init_default_group(device_type)
    collectives.bind_device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = layout_for(world)

    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.virtual_pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        order=MEGATRON_ORDER,
    )
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    model_parallel_cuda_manual_seed(seed)
    _seed_everything(seed, layout.coords(rank))
    ctx = ParallelContext(layout=layout, rank=rank, local_rank=local_rank, device=device, pg_collection=pg_collection)
    log.debug("rank %d coords %s on %s", rank, ctx.coords, device)
    return ctx


def _init_default_group(device_type: str) -> None:
    if "RANK" not in os.environ:
        # A single process started without torchrun: make a world of one.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_everything(seed: int, coords: dict[str, int]) -> None:
    # The default generators differ per pipeline stage (like megatron-core's
    # `seed + 100 * pp_rank`) so stages never share a dropout stream; the model-parallel
    # tracker adds the TP offset. Weight init does not use these (see kiln.model.init).
    import random

    import numpy as np

    stage_seed = seed + 100 * coords["pp"]
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
