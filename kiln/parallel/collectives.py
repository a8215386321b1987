"""kiln's own collectives: the one place outside megatron-core, DeepSpeed and torch FSDP that
talks to ``torch.distributed``.

Every statistic kiln reduces (losses, evaluation, data wait, the preemption flag, the fsdp
engine's grad norm) is built here on the run's device, and kernels' per-token values are
reduced here in place. That matters on GPUs: NCCL only reduces CUDA tensors, so a CPU tensor
that gloo happily sums fails there at the first logged step ("No backend type associated with
device type cpu"). The device is bound once, by :func:`kiln.parallel.backend.init_parallel`,
and no caller passes one: a statistic on the wrong device cannot be written. Object collectives
(pickled Python values) and barriers go through here too, so a test can hold every other module
to "no direct collectives".
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_device: torch.device | None = None


def bind_device(device: torch.device) -> None:
    """The device every reduced tensor lives on: the rank's GPU under NCCL, the CPU under gloo."""
    global _device
    _device = torch.device(device)


def bound_device() -> torch.device:
    if _device is None:
        raise RuntimeError("kiln.parallel.collectives: no device bound; init_parallel binds the run's device")
    return _device


def reduce_floats(values: Sequence[float], op: str = "sum", group=None) -> list[float]:
    """Element-wise ``op`` of ``values`` over ``group`` (default: the world), on the bound device."""
    # float64 on CUDA too: NCCL reduces doubles, and token counts pass 2**24 quickly.
    tensor = torch.tensor(list(values), dtype=torch.float64, device=bound_device())
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor.tolist()


def reduce_tensor_(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Element-wise ``op`` of an activation-derived ``tensor`` over ``group``, in place.

    For values a kernel computes (kiln.kernels.cross_entropy's per-token log-sum-exp): they
    already live where the computation runs, so nothing is copied; a tensor elsewhere than the
    bound device is refused here rather than by NCCL.
    """
    if tensor.device != bound_device():
        raise RuntimeError(f"kiln.parallel.collectives: reducing a tensor on {tensor.device}, "
                           f"but the run's device is {bound_device()}")
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def mean_over_holders(value: float | None, group=None) -> float:
    """The mean of ``value`` over the ranks that have one (the others pass None).

    With pipelines only the last stage has a loss; every last-stage rank of a replica holds
    the same (tp, cp) value, so the mean over holders is the mean over data-parallel replicas.
    """
    total, holders = reduce_floats([value or 0.0, 0.0 if value is None else 1.0], group=group)
    return total / holders if holders else float("nan")


def barrier() -> None:
    dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def ring_exchange(tensor: torch.Tensor, send_to: int, receive_from: int, group, tag: int):
    """Send ``tensor`` to global rank ``send_to`` while receiving a tensor of its shape from
    ``receive_from`` (one hop of a ring); returns (buffer, requests): wait on each request
    before reading the buffer or writing the tensor."""
    buffer = torch.empty_like(tensor)
    requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, send_to, group, tag),
                                       dist.P2POp(dist.irecv, buffer, receive_from, group, tag)])
    return buffer, requests
