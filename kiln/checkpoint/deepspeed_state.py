"""The DeepSpeed engine's model and optimizer as layout-free sharded state.

DeepSpeed's own checkpoints hold each rank's flat ZeRO partition, which only loads at the DP
size that wrote it (or after an offline conversion to its "universal" format). kiln instead
asks ZeRO for every parameter's whole (TP-local) fp32 value and Adam moments, and writes them
as megatron-core ShardedTensors that carry the model's own TP sharding. That is the format
the megatron engine writes, so DCP reshards on load like any other kiln checkpoint: a ZeRO-3
run saved at DP=2 resumes at DP=1, or the reverse, or at another stage or TP size.

Saving: ZeRO's gathers are collective, one parameter at a time, so every DP rank sees each
whole value for a moment; each parameter is kept (in CPU memory) and written by one DP rank
only, chosen to balance bytes, so each rank holds and writes about 1/dp of the state. Loading reads the whole
values on every rank (in CPU memory) and each rank keeps its ZeRO partition of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kiln.errors import KilnCheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")


def checkpoint_template(module: torch.nn.Module) -> dict[str, Any]:
    """The module's sharded state dict, taken while its parameters are whole (before ZeRO-3
    partitions them), with data swapped for shape-only meta tensors."""
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


def sharded_state(ds, *, is_loading: bool) -> dict[str, Any]:
    """``{"model0": …, "optimizer": {"exp_avg": …, "exp_avg_sq": …, "fp32_param"?: …, "common": …}}``.

    Collective over the whole world: ZeRO's gathers run parameter by parameter, in order.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from megatron.core.dist_checkpointing import ShardedObject

    template = ds.checkpoint_template
    params = dict(ds.module.named_parameters())
    dp, dp_rank = ds.ctx.layout.dp, ds.ctx.coords["dp"]
    half = ds.config.train.precision != "fp32"
    model: dict[str, Any] = {k: v for k, v in template.items() if k not in params}  # e.g. _extra_state objects
    optimizer: dict[str, Any] = {name: {} for name in (*MOMENTS, *(("fp32_param",) if half else ()))}
    owner = writers({key: template[key].data.shape for key in params}, dp)
    for key, param in params.items():  # the same order on every rank: ZeRO's gathers are collective
        entry = template[key]
        shape = entry.data.shape
        shift = (dp_rank - owner[key]) % dp  # 0 on the DP rank that writes this parameter
        if is_loading:  # every rank reads every value; replica ids must still be distinct
            model[key] = _entry(entry, None, torch.empty(shape, dtype=param.dtype), dp_rank)
            for name in optimizer:
                optimizer[name][key] = _entry(entry, f"optimizer.{name}.{entry.key}", torch.empty(shape), dp_rank)
            continue
        master = safe_get_full_fp32_param(param).view(shape)
        values = {name: master if name == "fp32_param" else safe_get_full_optimizer_state(param, name).view(shape)
                  for name in optimizer}
        # The working weight is the master cast to the parameter's dtype (that is how ZeRO makes it).
        weight = master.to(param.dtype)
        model[key] = _entry(entry, None, weight.cpu() if shift == 0 else _placeholder(shape, weight.dtype), shift)
        for name, value in values.items():
            data = value.cpu() if shift == 0 else _placeholder(shape, value.dtype)
            optimizer[name][key] = _entry(entry, f"optimizer.{name}.{entry.key}", data, shift)
    optimizer["common"] = ShardedObject("optimizer.deepspeed_common", {} if is_loading else _common_state(ds), (1,),
                                        (0,), replica_id=ds.ctx.rank)
    return {"model0": model, "optimizer": optimizer}


def _common_state(ds) -> dict[str, Any]:
    steps = {int(state["step"]) for state in ds.base_optimizer.state.values() if "step" in state}
    state: dict[str, Any] = {"adam_step": max(steps) if steps else 0, "zero_stage": ds.zero_stage}
    scaler = getattr(ds.optimizer, "loss_scaler", None)
    if ds.config.train.precision == "fp16" and scaler is not None:
        state["loss_scaler"] = {k: getattr(scaler, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
                                if hasattr(scaler, k)}
    return state


def load(ds, loaded: dict[str, Any]) -> None:
    """Write loaded whole values into ZeRO's partitions (master weights, moments, working weights)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    lazy_link = getattr(ds.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if lazy_link is not None:  # ZeRO-1/2 link moments to parameters at the first step; loading is first
        lazy_link()
    model, optimizer = loaded["model0"], loaded["optimizer"]
    device = ds.ctx.device
    for key, param in ds.module.named_parameters():
        if key not in model:
            raise KilnCheckpointError(f"checkpoint has no value for parameter {key}")
        master = optimizer["fp32_param"][key] if "fp32_param" in optimizer else model[key]
        safe_set_full_fp32_param(param, master.to(device, torch.float32))
        for name in MOMENTS:
            safe_set_full_optimizer_state(param, optimizer[name][key].to(device, torch.float32), name)
    _masters_to_working_weights(ds)
    common = optimizer["common"]
    for state in ds.base_optimizer.state.values():
        step = state["step"]
        state["step"] = step.fill_(common["adam_step"]) if isinstance(step, torch.Tensor) else common["adam_step"]
    scaler = getattr(ds.optimizer, "loss_scaler", None)
    for attr, value in common.get("loss_scaler", {}).items():
        setattr(scaler, attr, value)


def _masters_to_working_weights(ds) -> None:
    opt = ds.optimizer
    if ds.zero_stage == 3:
        for group in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(group)
    else:
        opt.update_lp_params()
