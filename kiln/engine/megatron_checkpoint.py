"""The megatron engine's checkpoint state: every data-parallel rank writes and reads its own share.

On disk this is megatron-core's ``fully_reshardable`` distributed-optimizer format: the common
optimizer state (param groups, step, grad scaler) in its common state (``common.pt`` up to megatron-core 0.18, inside the DCP files from 0.19), and per parameter the fp32
main weights and Adam moments as whole tensors with the model's own TP/PP sharding, under
``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``; so any TP/PP/DP layout, and the
deepspeed and fsdp engines, read it. What differs is who writes what:

* megatron-core builds that format by gathering the whole optimizer state onto every DP
  rank, synchronously (host memory for all of it on every rank, e.g. ~48 GB at 8B with TP=2),
  and only DP rank 0 writes it. Here each DP rank writes the range of each parameter its
  distributed optimizer holds, cut into rectangles (:mod:`kiln.engine.flat_shards`), straight
  from the live state: no communication, no gathered copy, every rank writing 1/dp of it.
  Loading asks for the same rectangles of the new layout, read into the live state in place,
  from a checkpoint written by any layout (or by megatron-core's own gathering writer);
* the model weights (and, without the distributed optimizer, the optimizer state, which every
  DP rank holds whole) are handed out over the DP ranks to balance the bytes each writes,
  instead of all on DP rank 0.

Also here: the optimizer state made for a load before any step (:func:`ensure_adam_state`).
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.engine.flat_shards import dp_replica, flat_entries, settle

# Asked of megatron-core's own sharded state (plain optimizer): reshardable over TP, PP, DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
SHARDING_TYPE = "fully_reshardable"  # what the files hold, so megatron-core's own loader reads them too
_TARGETS = "kiln_load_targets"


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _is_distributed(inner) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(inner, DistributedOptimizer)


def keeps_step_per_param(adam: torch.optim.Optimizer) -> bool:
    """torch's Adam/AdamW keep ``step`` in each parameter's state; TE's and Apex's FusedAdam keep
    it in the param group (TE's ``state_dict()`` looks every per-parameter key up in its dtype
    map, which has no ``step``)."""
    return type(adam).__module__.startswith("torch.")


def optimizer_step_count(optimizer) -> int:
    """Adam's step counter (0 before the first step)."""
    for inner in _inner_optimizers(optimizer):
        for state in inner.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        for group in inner.optimizer.param_groups:
            if group["params"] and "step" in group:
                return int(group["step"])
    return 0


def ensure_adam_state(optimizer) -> None:
    """Give every parameter an (all-zero) optimizer state before a load fills it in place.

    A fresh optimizer has none until its first step, and megatron-core reads it while building
    what to load. The state is the optimizer class's own: megatron-core's ``init_state_fn`` for
    the class it chose (moments; TE's ``initialize_state`` with precision-aware settings), plus a
    per-parameter ``step`` only where the class keeps one (torch's Adam).
    """
    for inner in _inner_optimizers(optimizer):
        adam = inner.optimizer
        if getattr(inner, "init_state_fn", None) is not None:
            inner.init_state_fn(adam, inner.config)
        if keeps_step_per_param(adam):
            for group in adam.param_groups:
                # torch's fused (and capturable) Adam keeps the step on the parameter's device.
                on_device = group.get("fused") or group.get("capturable")
                for param in group["params"]:
                    adam.state[param].setdefault("step", torch.zeros((), dtype=torch.float32, device=param.device)
                                                 if on_device else torch.tensor(0.0))


def _restore_zero_step(state: Any) -> None:
    """megatron-core saves torch Adam's shared step only when it is truthy (``if step:``), so a
    checkpoint from before the first step (``kiln ckpt import``) has none, and torch's Adam
    refuses per-parameter states without one: give them the step 0 they were saved at."""
    if isinstance(state, dict) and "param_groups" in state and isinstance(state.get("state"), dict):
        params = state["state"]
        if "common_step" not in params and any("step" not in value for value in params.values()):
            params["common_step"] = torch.tensor(0.0)
        return
    for value in (state.values() if isinstance(state, dict) else ()):
        _restore_zero_step(value)


def _unshare_steps(optimizer) -> None:
    """megatron-core restores torch Adam's ``step`` as one tensor shared by every parameter, so
    each optimizer step would advance it once per parameter: give each its own copy."""
    for inner in _inner_optimizers(optimizer):
        for state in inner.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


# -- who writes the replicated tensors -------------------------------------------------------
def balanced_owners(sizes: list[int], ranks: int) -> list[int]:
    """For each size, the rank that writes it: largest first onto the least loaded rank (the
    same answer on every rank, given the same sizes in the same order)."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += sizes[index]
    return owner


def spread_writes(model_state: dict[str, Any], dp_rank: int, dp_size: int) -> None:
    """Hand each DP-replicated model tensor to one DP rank to write (its replica id's DP
    component 0 there), balancing bytes, instead of DP rank 0 writing them all.

    Every DP rank of a (TP, PP) position holds the same dense tensors in the same order, so each
    computes the same assignment without communication. MoE experts (megatron-core marks their
    weights ``allreduce=False``) differ between the ranks of a DP group (each holds its expert-
    parallel share) and are replicated over the expert-DP group instead: their writers stay
    megatron-core's (expert-DP rank 0).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    if dp_size == 1:
        return
    entries = [e for e in nested_values(model_state) if isinstance(e, (ShardedTensor, ShardedTensorFactory))
               and isinstance(e.replica_id, tuple) and e.replica_id[-1] == dp_rank
               and getattr(e.data, "allreduce", True)]
    owners = balanced_owners([e.data.numel() * e.data.element_size() for e in entries], dp_size)
    for entry, owner in zip(entries, owners):
        entry.replica_id = dp_replica(entry.replica_id, (dp_rank - owner) % dp_size)


# -- the engine's sharded state ----------------------------------------------------------------
def sharded_state(models, optimizer, dp_group, *, is_loading: bool) -> dict[str, Any]:
    """``{"model<i>": …, "optimizer": …}`` of the megatron engine (see the module docstring)."""
    # Loading fills the state in place; a save before the first step (`kiln ckpt import`, a stop
    # signal at once) must still hold the moments a load asks for.
    ensure_adam_state(optimizer)
    state: dict[str, Any] = {f"model{i}": model.module.sharded_state_dict() for i, model in enumerate(models)}
    if not is_loading:
        spread_writes(state, dp_group.rank(), dp_group.size())
    inners = _inner_optimizers(optimizer)
    if not all(_is_distributed(inner) for inner in inners):
        # The plain optimizer: every DP rank holds the whole state; its tensors take the replica
        # ids (and so the writers) of the model tensors they belong to. The optimizer maps its
        # params to the model's ShardedTensors through all chunks (nested, not merged:
        # interleaved chunks share local key names).
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA)
        return state
    entries = _model_entries(state)
    per_inner = [_distributed_state(inner, entries, f"chained_{i}." if len(inners) > 1 else "", is_loading)
                 for i, inner in enumerate(inners)]
    state["optimizer"] = per_inner[0] if len(per_inner) == 1 else dict(enumerate(per_inner))
    return state


def _model_entries(state: dict[str, Any]) -> dict[torch.Tensor, Any]:
    """Each parameter's model entry (ShardedTensor or factory), found by its data."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {entry.data: entry for entry in nested_values(state)
            if isinstance(entry, (ShardedTensor, ShardedTensorFactory))}


def _own_ranges(inner):
    """(model param, start) of every parameter range this DP rank's optimizer holds."""
    for buffer_ranges in inner.gbuf_ranges:
        for bucket_ranges in buffer_ranges.values():
            for bucket in bucket_ranges:
                for model_param, ranges in bucket["param_map"].items():
                    yield model_param, ranges["param"].start


def _distributed_state(inner, entries: dict, key_prefix: str, is_loading: bool) -> dict[str, Any]:
    """One distributed optimizer's state: common values (saving) and, per parameter this rank
    holds a range of, rectangles of its main weights and moments viewing the live tensors."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    state: dict[str, Any] = {} if is_loading else {**inner.state_dict(), "param_state_sharding_type": SHARDING_TYPE}
    blocks: dict[int, dict[str, list]] = {}
    targets = []
    for index, (model_param, start) in enumerate(_own_ranges(inner)):
        entry = entries.get(model_param)
        if entry is None:
            raise KeyError(f"a parameter of shape {tuple(model_param.shape)} has no entry in the model's sharded "
                           "state dict")
        tensors = inner._get_main_param_and_optimizer_states(model_param)  # {"param", "exp_avg", …}: 1-D
        blocks[index] = {name: flat_entries(entry, f"{key_prefix}optimizer.state.{name}.", value.view(-1), start)
                         for name, value in tensors.items() if value.dim() > 0}  # not torch Adam's 0-d step
        targets.append((model_param, tensors, blocks[index]))
    state["param_state"] = blocks
    if is_loading:
        state[_TARGETS] = LocalNonpersistentObject(targets)
    return state


@torch.no_grad()
def load_sharded_state(models, optimizer, loaded: dict[str, Any]) -> None:
    """Put a loaded :func:`sharded_state` into the model and optimizer."""
    for index, model in enumerate(models):
        model.module.load_state_dict(loaded[f"model{index}"])
    inners = _inner_optimizers(optimizer)
    if not all(_is_distributed(inner) for inner in inners):
        if all(keeps_step_per_param(inner.optimizer) for inner in inners):
            _restore_zero_step(loaded["optimizer"])
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_steps(optimizer)
        return
    states = [loaded["optimizer"]] if len(inners) == 1 else [loaded["optimizer"][i] for i in range(len(inners))]
    restore = [(state.pop(_TARGETS), state.pop("param_state")) for state in states]
    for state in states:
        state.pop("param_state_sharding_type", None)
    # Param groups, step and grad scaler (with no 'param_state' megatron-core leaves the tensors alone).
    optimizer.load_state_dict(states[0] if len(states) == 1 else dict(enumerate(states)))
    for inner, (targets, param_state) in zip(inners, restore):
        for index, (model_param, tensors, requested) in enumerate(targets):
            for name, blocks in requested.items():
                settle(blocks, param_state[index][name])
            # Into the optimizer's current tensors (a copy only where they are not the ones read
            # into: precision-aware optimizers hand out unscaled copies); its step stays its own.
            current = inner._get_main_param_and_optimizer_states(model_param)
            current.update({name: value for name, value in tensors.items() if value.dim() > 0})
            inner._set_main_param_and_optimizer_states(model_param, current)
    _unshare_steps(optimizer)
