"""Per-parameter whole-value checkpoints: the format of the deepspeed and fsdp engines.

ZeRO and FSDP keep each parameter's state as flat partitions over the data-parallel ranks
(padded, in an engine-specific order), which only load at the DP size that wrote them. These
engines instead gather every parameter's whole (TP-local) value and Adam moments and write
them as megatron-core ShardedTensors carrying the model's own TP sharding, under the keys
megatron-core's optimizer uses:

* ``model0.<param>``: the working weights (the megatron engine's keys exactly);
* ``optimizer.state.exp_avg.<param>``, ``optimizer.state.exp_avg_sq.<param>``: Adam's moments;
* ``optimizer.state.fp32_param.<param>``: the fp32 master weights, when training in bf16/fp16;
* ``optimizer.portable_common``: the Adam step and, for fp16, the loss scaler.

So DCP reshards on load like any other kiln checkpoint (another DP size, TP size, ZeRO stage,
or from one of these engines to the other), and a megatron engine checkpoint loads too: its
tensors have the same keys (its master weights are ``optimizer.state.param`` with the
distributed optimizer), and its Adam step is in its kiln.json state.

Saving: the gathers are collective, one parameter at a time, so every DP rank sees each whole
value for a moment; each parameter is kept (in CPU memory) and written by one DP rank only,
chosen to balance bytes, so each rank holds and writes about 1/dp of the state. Loading reads
the whole values on every rank (in CPU memory) and each rank keeps its own share of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch

from kiln.errors import KilnCheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")
PREFIX = "optimizer.state"
MASTER = "fp32_param"
# Where a checkpoint keeps fp32 master weights: this format and megatron's plain optimizer,
# then megatron's distributed optimizer (fully_reshardable).
MASTER_NAMES = ("fp32_param", "param")
COMMON_KEY = "optimizer.portable_common"


def checkpoint_template(module: torch.nn.Module) -> dict[str, Any]:
    """The module's sharded state dict, taken while its parameters are whole (before ZeRO-3 or
    FSDP shard them), with data swapped for shape-only meta tensors."""
    params = dict(module.named_parameters())
    template = module.sharded_state_dict()
    for key, entry in template.items():
        if key in params:
            entry.data = torch.empty(params[key].shape, dtype=params[key].dtype, device="meta")
    return template


def _placeholder(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Right shape, no memory: for copies this rank declares but does not write."""
    return torch.zeros((), dtype=dtype).expand(shape)


def _entry(template_entry, key: str | None, data: torch.Tensor, replica_shift: int):
    """A ShardedTensor/Factory like the template's, with ``data``, whose replica id has
    ``replica_shift`` as its DP component (megatron's last): 0 on the DP rank that writes it."""
    from megatron.core.dist_checkpointing import ShardedTensor

    replica = template_entry.replica_id
    replica = (*replica[:-1], replica_shift) if isinstance(replica, tuple) else replica_shift
    changes: dict[str, Any] = {"data": data, "replica_id": replica}
    if key is not None:
        changes["key"] = key
    if isinstance(template_entry, ShardedTensor):  # a factory takes its dtype from data
        changes["dtype"] = data.dtype
    return dataclasses.replace(template_entry, **changes)


def writers(shapes: dict[str, torch.Size], dp: int) -> dict[str, int]:
    """The DP rank that keeps and writes each parameter: largest first onto the least loaded
    rank, so every rank writes about 1/dp of the bytes (the same answer on every rank)."""
    load = [0] * dp
    owner = {}
    for key in sorted(shapes, key=lambda k: (-shapes[k].numel(), k)):
        rank = min(range(dp), key=lambda r: (load[r], r))
        owner[key] = rank
        load[rank] += shapes[key].numel()
    return owner


def master_name_in(tensor_keys: Iterable[str]) -> str | None:
    """Which master-weight name a checkpoint uses, or None (fp32 training keeps no masters)."""
    keys = list(tensor_keys)
    for name in MASTER_NAMES:
        if any(k.startswith(f"{PREFIX}.{name}.") for k in keys):
            return name
    return None


@dataclasses.dataclass
class PortableRequest:
    """How to read a checkpoint into the portable layout."""

    master: str | None  # the checkpoint's master-weight name, None: take the model weights
    has_common: bool  # written by a portable engine (its Adam step is a ShardedObject)


def request_for(saved) -> PortableRequest | None:
    """What to read from a checkpoint (a ``SavedEngine``, or None when saving): a portable one as
    written, a megatron one by the tensor names it holds."""
    if saved is None:
        return None
    return PortableRequest(master=master_name_in(saved.tensor_keys), has_common=saved.checkpoint_format == "portable")


def sharded_state(template: dict[str, Any], params: dict[str, torch.nn.Parameter],
                  full_values: Callable[[str, torch.nn.Parameter], dict[str, torch.Tensor]],
                  *, dp: int, dp_rank: int, rank: int, half: bool, is_loading: bool, common: dict[str, Any],
                  request: PortableRequest | None = None) -> dict[str, Any]:
    """``{"model0": …, "optimizer": {…}}`` in the portable format.

    ``full_values(key, param)`` returns the whole (TP-local) fp32 ``master`` and Adam moments of
    one parameter; it is collective, so every rank calls it for every parameter in the same order.
    """
    from megatron.core.dist_checkpointing import ShardedObject

    request = request or PortableRequest(master=MASTER if half else None, has_common=True)
    model: dict[str, Any] = {k: v for k, v in template.items() if k not in params}  # e.g. _extra_state objects
    names = (*MOMENTS, *((MASTER,) if half else ()))
    optimizer: dict[str, Any] = {name: {} for name in names}
    owner = writers({key: template[key].data.shape for key in params}, dp)
    for key, param in params.items():
        entry = template[key]
        shape = entry.data.shape
        if is_loading:  # every rank reads every value; replica ids must still be distinct
            model[key] = _entry(entry, None, torch.empty(shape, dtype=entry.data.dtype), dp_rank)
            for name in optimizer:
                stored = request.master if name == MASTER else name
                if stored is not None:
                    optimizer[name][key] = _entry(entry, f"{PREFIX}.{stored}.{entry.key}", torch.empty(shape), dp_rank)
            continue
        shift = (dp_rank - owner[key]) % dp  # 0 on the DP rank that writes this parameter
        values = full_values(key, param)
        master = values["master"].view(shape)
        weight = master.to(entry.data.dtype)  # the working weight is the master in the training dtype
        model[key] = _entry(entry, None, weight.cpu() if shift == 0 else _placeholder(shape, weight.dtype), shift)
        for name in optimizer:
            value = master if name == MASTER else values[name].view(shape)
            data = value.cpu() if shift == 0 else _placeholder(shape, value.dtype)
            optimizer[name][key] = _entry(entry, f"{PREFIX}.{name}.{entry.key}", data, shift)
    if request.has_common:
        optimizer["common"] = ShardedObject(COMMON_KEY, {} if is_loading else common, (1,), (0,), replica_id=rank)
    return {"model0": model, "optimizer": optimizer}


def loaded_values(loaded: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    """The whole fp32 master and moments of one parameter from a loaded :func:`sharded_state`."""
    model, optimizer = loaded["model0"], loaded["optimizer"]
    if key not in model:
        raise KilnCheckpointError(f"checkpoint has no value for parameter {key}")
    masters = optimizer.get(MASTER, {})
    master = masters[key] if key in masters else model[key]
    return {"master": master.float(), **{name: optimizer[name][key].float() for name in MOMENTS}}


def loaded_common(loaded: dict[str, Any], saved_state: dict[str, Any], saved_step: int) -> dict[str, Any]:
    """The portable common state; for a megatron checkpoint, its Adam step from its kiln.json state."""
    common = loaded["optimizer"].get("common")
    if common is not None:
        return common
    return {"adam_step": int(saved_state.get("adam_step", saved_step))}
