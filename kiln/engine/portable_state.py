"""Per-parameter whole-value checkpoints: the format of the deepspeed and fsdp engines.

ZeRO and FSDP keep each parameter's state as flat partitions over the data-parallel ranks
(padded, in an engine-specific order), which only load at the DP size that wrote them. These
engines instead store every parameter's whole (TP-local) value and Adam moments as
megatron-core ShardedTensors carrying the model's own TP sharding (each DP rank writing the
part it holds, see below), under the keys megatron-core's optimizer uses:

* ``model0.<param>``: the working weights (the megatron engine's keys exactly);
* ``optimizer.state.exp_avg.<param>``, ``optimizer.state.exp_avg_sq.<param>``: Adam's moments;
* ``optimizer.state.fp32_param.<param>``: the fp32 master weights, when training in bf16/fp16;
* ``optimizer.portable_common``: the Adam step and, for fp16, the loss scaler.

So DCP reshards on load like any other kiln checkpoint (another DP size, TP size, ZeRO stage,
or from one of these engines to the other), and a megatron engine checkpoint loads too: its
tensors have the same keys (its master weights are ``optimizer.state.param`` with the
distributed optimizer), and its Adam step is in its kiln.json state.

Each rank writes and reads only what it holds (:mod:`kiln.engine.flat_shards`): ZeRO and
FSDP keep each parameter's master weights and moments as one contiguous range of its
flattened value per DP rank (a ZeRO-1/2 partition fragment, a ZeRO-3 slice, an FSDP block of
rows); the engine hands those ranges over as views of its live state, a save writes them
(with the working weight cast from the master) without any gather, and a load reads the
ranges of the new layout straight into them. So every rank writes about 1/dp of the bytes,
and neither side holds more host memory than its own share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch

from kiln.engine.flat_shards import FlatShare, flat_entries, settle

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
                  local_share: Callable[[str, torch.nn.Parameter], FlatShare | None],
                  *, half: bool, is_loading: bool, rank: int, common: dict[str, Any],
                  request: PortableRequest | None = None) -> dict[str, Any]:
    """``{"model0": …, "optimizer": {…}}`` in the portable format, this rank's share only.

    ``local_share(key, param)`` is the rank's range of one parameter: 1-D tensors ``master``
    (fp32) and the Adam moments, views of the live state wherever the engine has them (a load
    reads into them), or None where the rank holds none of it.
    """
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    request = request or PortableRequest(master=MASTER if half else None, has_common=True)
    model: dict[str, Any] = {k: v for k, v in template.items() if k not in params}  # e.g. _extra_state objects
    optimizer: dict[str, Any] = {name: {} for name in (*MOMENTS, MASTER)}
    shares = []
    for key, param in params.items():
        share = local_share(key, param)
        if share is None or share.numel == 0:
            continue
        entry, master = template[key], share.tensors["master"]

        def blocks(prefix: str, flat: torch.Tensor) -> list:
            return flat_entries(entry, prefix, flat, share.start)

        requested: dict[tuple[str, str], list] = {}
        if is_loading:  # the master from where the checkpoint keeps it: its masters, else its weights
            where = ("model0", key) if request.master is None else (MASTER, key)
            requested[where] = blocks("" if request.master is None else f"{PREFIX}.{request.master}.", master)
        else:  # the working weight is the master in the training dtype
            requested["model0", key] = blocks("", master.to(entry.data.dtype))
            if half:
                requested[MASTER, key] = blocks(f"{PREFIX}.{MASTER}.", master)
        for name in MOMENTS:
            requested[name, key] = blocks(f"{PREFIX}.{name}.", share.tensors[name])
        for (where, _), value in requested.items():
            (model if where == "model0" else optimizer[where])[key] = value
        shares.append((share, requested))
    optimizer = {name: tensors for name, tensors in optimizer.items() if tensors}
    if request.has_common:
        optimizer["common"] = ShardedObject(COMMON_KEY, {} if is_loading else common, (1,), (0,), replica_id=rank)
    if is_loading:
        optimizer["local_shares"] = LocalNonpersistentObject(shares)
    return {"model0": model, "optimizer": optimizer}


def finish_load(loaded: dict[str, Any]) -> None:
    """Make sure every share holds what was loaded for it, and hand it back to the engine where
    the share was a copy (:attr:`FlatShare.store`)."""
    for share, requested in loaded["optimizer"]["local_shares"]:
        for (where, key), blocks in requested.items():
            settle(blocks, (loaded["model0"] if where == "model0" else loaded["optimizer"][where])[key])
        if share.store is not None:
            share.store()


def loaded_common(loaded: dict[str, Any], saved_state: dict[str, Any], saved_step: int) -> dict[str, Any]:
    """The portable common state; for a megatron checkpoint, its Adam step from its kiln.json state."""
    common = loaded["optimizer"].get("common")
    if common is not None:
        return common
    return {"adam_step": int(saved_state.get("adam_step", saved_step))}
