"""The DeepSpeed engine's model and optimizer as layout-free sharded state.

DeepSpeed's own checkpoints hold each rank's flat ZeRO partition, which only loads at the DP
size that wrote it (or after an offline conversion to its "universal" format). kiln instead
asks ZeRO for every parameter's whole (TP-local) fp32 value and Adam moments, and writes them
as megatron-core ShardedTensors that carry the model's own TP sharding and are replicated over
DP. That is the format the megatron engine writes, so the files are resharded on load by DCP
like any other kiln checkpoint: a ZeRO-3 run saved at DP=2 resumes at DP=1, or the reverse.

Cost: while the state dict is built, each rank holds one whole fp32 copy of its TP shard of
the parameters and of each Adam moment (ZeRO's gathers are collective, so every DP rank gets
the values; only DP rank 0 writes them).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from kiln.errors import KilnCheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")


@contextlib.contextmanager
def _whole_parameters(ds):
    """ZeRO-3 keeps only partitions in the module; gather the whole parameters for a while."""
    if ds.zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(ds.module.parameters()), modifier_rank=None):
        yield


def _model_state(ds) -> tuple[dict[str, Any], dict[str, torch.nn.Parameter]]:
    """The module's sharded state dict with every parameter's whole value copied out."""
    params = dict(ds.module.named_parameters())
    with _whole_parameters(ds):
        state = ds.module.sharded_state_dict()
        for key, entry in state.items():
            if key in params:
                entry.data = params[key].detach().clone()
    return state, params


def sharded_state(ds, *, is_loading: bool) -> dict[str, Any]:
    """``{"model0": …, "optimizer": {"exp_avg": …, "exp_avg_sq": …, "fp32_param"?: …, "common": …}}``.

    Collective over the whole world: ZeRO's gathers run parameter by parameter, in order.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    model, params = _model_state(ds)
    half = ds.config.train.precision != "fp32"
    optimizer: dict[str, Any] = {name: {} for name in (*MOMENTS, *(("fp32_param",) if half else ()))}
    for key, param in params.items():
        for name in optimizer:
            if is_loading:
                value = torch.empty(model[key].data.shape, dtype=torch.float32, device=param.device)
            elif name == "fp32_param":
                value = safe_get_full_fp32_param(param)
            else:
                value = safe_get_full_optimizer_state(param, name)
            optimizer[name][key] = make_sharded_optimizer_tensor(model[key], value.view(model[key].data.shape),
                                                                 prefix=f"optimizer.{name}")
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
    for key, param in ds.module.named_parameters():
        if key not in model:
            raise KilnCheckpointError(f"checkpoint has no value for parameter {key}")
        master = optimizer["fp32_param"][key] if "fp32_param" in optimizer else model[key]
        safe_set_full_fp32_param(param, master.float())
        for name in MOMENTS:
            safe_set_full_optimizer_state(param, optimizer[name][key].float(), name)
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
