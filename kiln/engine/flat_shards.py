"""A rank's share of a parameter as checkpoint tensors: a flat range cut into rectangles.

Every sharded optimizer kiln drives keeps, on each data-parallel rank, one contiguous range
of each parameter's flattened (TP-local) value: megatron's distributed optimizer (ranges of
its gradient buckets), ZeRO-1/2 (ranges of the flat partition), ZeRO-3 (a 1/dp slice of
each parameter) and FSDP2 (a block of rows). A checkpoint stores whole tensors under global
keys, so any layout can read any region of them; this module maps a rank's flat range to the
regions it covers, so each rank writes and reads its own share and nothing else:

* a flat range ``[start, stop)`` of a row-major tensor is exactly tiled by at most
  ``2 × ndim − 1`` rectangles (a partial row, whole rows, a partial row, recursively),
  which :func:`flat_blocks` lists in flat order;
* each rectangle becomes a megatron-core ``ShardedTensor`` without a regular grid
  (``axis_fragmentations=None``: torch DCP takes any set of non-overlapping chunks that
  covers the tensor) whose data is a view of the rank's flat tensor, so saving copies
  nothing on the training thread and loading reads straight into the live state;
* a ``ShardedTensorFactory`` (SwiGLU's fc1 is stored as two tensors, gate and up) is built
  on a shape-only meta tensor to learn which flat range of the parameter each of its
  tensors holds; the range is then cut per tensor.

megatron-core 0.16 has a format for this, ``fully_sharded_model_space``, built on
``ShardedTensor.flattened_range``, which 0.16 (and 0.19) reject at construction
("ShardedTensor.flattened_range is not supported"); rectangles need no such support.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import torch

from kiln.errors import KilnCheckpointError

Block = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, size) per dimension


def flat_blocks(shape: tuple[int, ...], start: int, stop: int) -> list[Block]:
    """The rectangles that tile elements ``[start, stop)`` of a row-major tensor, in flat order."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    row = math.prod(shape[1:])
    first, head = divmod(start, row)
    last, tail = divmod(stop, row)
    inner = tuple(shape[1:])
    if first == last:  # inside one row
        return [((first, *off), (1, *size)) for off, size in flat_blocks(inner, head, tail)]
    blocks: list[Block] = []
    if head:  # the rest of a partial first row
        blocks += [((first, *off), (1, *size)) for off, size in flat_blocks(inner, head, row)]
        first += 1
    if last > first:  # whole rows
        blocks.append(((first, *(0,) * len(inner)), (last - first, *inner)))
    if tail:  # the start of a partial last row
        blocks += [((last, *off), (1, *size)) for off, size in flat_blocks(inner, 0, tail)]
    return blocks


def _stored_tensors(entry) -> Iterator[tuple[Any, int]]:
    """The ShardedTensors a model entry is stored as, each with the flat offset in the
    parameter where its data starts (0 for a plain entry)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    if isinstance(entry, ShardedTensor):
        yield entry, 0
        return
    # A factory: build it on a meta tensor of the parameter's shape; the views it cuts say
    # where in the flat parameter each stored tensor's elements come from.
    probe = torch.empty(entry.data.shape, dtype=entry.data.dtype, device="meta")
    for sub in nested_values(entry.build_fn(entry.key, probe, entry.replica_id, None)):
        if not (sub.data is probe or sub.data._base is probe) or not sub.data.is_contiguous():
            raise KilnCheckpointError(f"checkpoint entry {entry.key}: its stored tensor {sub.key} is not a "
                                      "contiguous range of the parameter, which kiln cannot split by ranks")
        yield sub, sub.data.storage_offset()


def dp_replica(replica_id, dp_component: int = 0):
    """``replica_id`` with its data-parallel (last) component replaced."""
    return (*replica_id[:-1], dp_component) if isinstance(replica_id, tuple) else dp_component


def flat_entries(entry, key_prefix: str, flat: torch.Tensor, start: int) -> list:
    """ShardedTensors for elements ``[start, start + flat.numel())`` of the parameter that the
    model entry ``entry`` (a ShardedTensor or ShardedTensorFactory) describes, under
    ``key_prefix + <its key>``, their data views of ``flat`` (1-D).

    Their DP replica component is 0 on every rank: each rank's range is its own, not a copy;
    the other components (a TP-replicated norm gain, a tied embedding's second copy) stay, so
    only one of the identical copies is written.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    flat = flat.detach()  # a view of the same storage: loads write through it, outside autograd
    stop = start + flat.numel()
    out = []
    for stored, base in _stored_tensors(entry):
        lo, hi = max(start, base), min(stop, base + math.prod(stored.local_shape))
        lead = stored.prepend_axis_num
        for offset, size in flat_blocks(tuple(stored.local_shape), lo - base, hi - base):
            first = base + sum(o * s for o, s in zip(offset, _strides(stored.local_shape))) - start
            numel = math.prod(size)
            data = flat[first:first + numel].view((1,) * lead + size)
            out.append(ShardedTensor(
                key=key_prefix + stored.key, data=data, dtype=flat.dtype, local_shape=tuple(data.shape),
                global_shape=tuple(stored.global_shape),
                global_offset=(*stored.global_offset[:lead],
                               *(g + o for g, o in zip(stored.global_offset[lead:], offset))),
                axis_fragmentations=None, replica_id=dp_replica(stored.replica_id),
                allow_shape_mismatch=stored.allow_shape_mismatch))
    return out


def _strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def settle(requested: list, loaded: list) -> None:
    """After a load: copy into each requested block's data what was loaded for it, unless the
    load already wrote there (torch DCP reads into the tensors it is given)."""
    for block, value in zip(requested, loaded):
        if value.data_ptr() != block.data.data_ptr():
            block.data.copy_(value)


@dataclasses.dataclass
class FlatShare:
    """What one rank holds of one parameter: elements ``[start, start + numel)`` of its
    flattened value, as 1-D tensors by state name (views of the live state where possible)."""

    start: int
    tensors: dict[str, torch.Tensor]
    store: Callable[[], None] | None = None
    """After a load, puts the tensors back where they are copies of the live state (None: views)."""

    @property
    def numel(self) -> int:
        return next(iter(self.tensors.values())).numel()
