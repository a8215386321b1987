"""DeepSpeed ZeRO-1/2/3 as kiln's training engine, over megatron-core's tensor-parallel layers.

The model is the same megatron-core GPTModel the megatron engine trains (same layers, same
layout-independent init). DeepSpeed replaces megatron-core DDP and its optimizer: it gets the
model-parallel groups through :class:`MegatronGroups`, so ZeRO partitions optimizer states
(stage 1), gradients (2) and parameters (3) over the data-parallel group only, while the
tensor-parallel collectives stay inside megatron-core's layers.

kiln writes the DeepSpeed config from its own (:func:`deepspeed_config`); a ``deepspeed:``
section in the run config is merged over it for anything kiln does not set. The LR schedule
is kiln's (megatron-core's ``OptimizerParamScheduler``, driving the ZeRO optimizer's param
groups), so both engines follow the same curve.

Checkpoints do not use DeepSpeed's per-rank files, which only load at the DP size they were
written with. :mod:`kiln.checkpoint.deepspeed_state` writes every parameter and its Adam
moments as whole (TP-sharded) tensors in the same DCP format as the megatron engine, so a
ZeRO checkpoint loads at any DP size, with no conversion step.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from kiln.config import RunConfig

log = logging.getLogger("kiln")


def use_cpu_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator when first imported; on CPU it must be told.

    Its CPU communication backend also JIT-compiles a shared-memory all-reduce op (a minute
    of g++ on a fresh machine, and a compiler it may not have) that only its inference path
    uses; marking the op incompatible makes it skip the build and use gloo for everything.
    """
    if device.type != "cpu":
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class MegatronGroups:
    """megatron-core's process groups under the names DeepSpeed's ``mpu`` argument expects.

    Model parallelism is tensor parallelism here (the engine has no pipeline), and DeepSpeed's
    data-parallel group is megatron-core's, so ZeRO shards over DP ranks only.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def check_deepspeed_environment(config: RunConfig) -> None:
    """What the config cannot know: does this machine support the engine's settings?"""
    from kiln.errors import KilnEnvironmentError
    from kiln.parallel.backend import resolve_device

    if config.parallel.engine != "deepspeed":
        return
    if resolve_device(config.train.device) == "cpu" and config.train.precision == "fp16":
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)()
        if not supported:
            raise KilnEnvironmentError(
                "train.precision=fp16 on this CPU: it has no fp16 kernels (DeepSpeed's CPU accelerator "
                "refuses it); use train.precision=bf16 or fp32 here, fp16 on a GPU")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _offload(where: str, config: RunConfig, cuda: bool) -> dict[str, Any]:
    target: dict[str, Any] = {"device": where, "pin_memory": cuda}
    if where == "nvme":
        target["nvme_path"] = config.parallel.nvme_path
    return target


def deepspeed_config(config: RunConfig, dp_size: int, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config of a kiln run; ``config.deepspeed`` is merged over it."""
    p, t = config.parallel, config.train
    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)
    zero: dict[str, Any] = {
        "stage": p.zero_stage,
        "contiguous_gradients": True,
        # Overlap needs a side stream; on CPU it only adds copies.
        "overlap_comm": cuda,
        "reduce_scatter": True,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if p.zero_stage == 3:
        # Keep small parameters (norm gains) whole on every rank; below this many elements a
        # gather costs more than the memory it saves.
        zero.update({"stage3_param_persistence_threshold": 10_000, "stage3_max_live_parameters": 1_000_000_000,
                     "stage3_prefetch_bucket_size": 50_000_000, "stage3_gather_16bit_weights_on_model_save": False})
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(p.offload_optimizer, config, cuda)
    if p.offload_params != "none":
        zero["offload_param"] = _offload(p.offload_params, config, cuda)
    generated = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # kiln builds the optimizer (torch AdamW, or DeepSpeed's CPU Adam when offloading).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # kiln logs the metrics
        "wall_clock_breakdown": False,
    }
    return _merge(generated, config.deepspeed or {})


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms or biases: the grouping megatron-core's optimizer uses."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]


def build_optimizer(config: RunConfig, model: torch.nn.Module, cuda: bool) -> torch.optim.Optimizer:
    o = config.optim
    groups = param_groups(model, o.weight_decay)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if config.parallel.offload_optimizer != "none":
        # ZeRO-Offload steps on the CPU; DeepSpeed's vectorised Adam is several times torch's there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=cuda, **kwargs)


class DeepSpeedEngine:
    """One rank's DeepSpeed engine around the megatron-core model, with kiln's step interface."""

    def __init__(self, config: RunConfig, ctx, model: torch.nn.Module) -> None:
        use_cpu_accelerator(ctx.device)
        import deepspeed

        from kiln.checkpoint.deepspeed_state import checkpoint_template

        self.config, self.ctx = config, ctx
        cuda = ctx.device.type == "cuda"
        ds_config = deepspeed_config(config, ctx.layout.dp, cuda)
        optimizer = build_optimizer(config, model, cuda)
        self.checkpoint_template = checkpoint_template(model)  # while ZeRO-3 has not yet partitioned it
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, mpu=MegatronGroups(),
            dist_init_required=False)
        self.module = self.engine.module
        self.zero_stage = self.engine.zero_optimization_stage()
        self.base_optimizer = self.optimizer.optimizer  # the torch/CPU Adam over ZeRO's flat partitions
        init_adam_state(self.base_optimizer, self.master_partitions())

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master partitions, the tensors the base Adam steps (and keys its state by)."""
        if self.zero_stage == 3:
            return list(self.optimizer.fp32_partitioned_groups_flat)  # stage 3 hands them to Adam per step
        return list(self.optimizer.single_partition_of_fp32_groups)

    # -- what the trainer calls -------------------------------------------------------
    def train_step(self, microbatches, forward, scheduler) -> tuple[torch.Tensor, float]:
        """Forward/backward every micro-batch, then one optimizer step (DeepSpeed accumulates)."""
        losses = []
        for index, batch in enumerate(microbatches):
            loss = forward(self.engine, batch).float().mean()
            self.engine.backward(loss)
            if index == len(microbatches) - 1:
                scheduler.step(increment=1)  # the LR of step k is schedule(k), as in the megatron engine
            self.engine.step()
            losses.append(loss.detach())
        if not self.engine.was_step_applied():
            # fp16 overflow: DeepSpeed skipped the update and lowered the loss scale; the
            # schedule stays where it was, as DeepSpeed's own schedulers do.
            scheduler.step(increment=-1)
        grad_norm = self.engine.get_global_grad_norm()
        stats = torch.zeros(2, dtype=torch.float64)
        stats[0] = float(torch.stack(losses).mean())
        stats[1] = 1.0
        return stats, float(grad_norm) if grad_norm is not None else float("nan")

    def eval_losses(self, batches, forward) -> list[float]:
        self.engine.eval()
        with torch.no_grad():
            losses = [float(forward(self.engine, batch).float().mean()) for batch in batches]
        self.engine.train()
        return losses

    def loss_scale(self) -> float | None:
        return float(self.optimizer.cur_scale) if self.config.train.precision == "fp16" else None


def init_adam_state(adam: torch.optim.Optimizer, partitions: list[torch.Tensor]) -> None:
    """Create Adam's moments now (zeros, step 0) rather than at the first step.

    Their memory is then visible in the start-up report, and a checkpoint can be loaded into
    them before any step. Zero moments at step 0 are exactly what Adam's lazy init would make
    (torch's AdamW keeps ``step`` as a float tensor, DeepSpeed's CPU Adam as an int).
    """
    from_torch = type(adam).__module__.startswith("torch.")
    on_device = adam.defaults.get("fused") or adam.defaults.get("capturable")
    for flat in partitions:
        if adam.state[flat]:
            continue
        step: Any = 0
        if from_torch:
            step = torch.zeros((), dtype=torch.float32, device=flat.device) if on_device else torch.tensor(0.0)
        adam.state[flat] = {"step": step, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def memory_report(engine: DeepSpeedEngine) -> dict[str, int]:
    """Measured bytes of this rank's parameters and optimizer states; gradients by ZeRO's rule.

    * parameters: the model's working weights this rank holds (ZeRO-3: its partitions);
    * optimizer: Adam's moments plus the fp32 master partitions, where they are not the
      working weights themselves;
    * gradients: allocated during backward, so not measurable at start: a full set for
      ZeRO-1, this rank's 1/DP partition for ZeRO-2 and 3, in the master precision.
    """
    module, opt = engine.module, engine.optimizer
    params = list(module.parameters())
    if engine.zero_stage == 3:
        param_bytes = _nbytes(p.ds_tensor for p in params)
    else:
        param_bytes = _nbytes(params)
    moments = _nbytes(v for state in engine.base_optimizer.state.values() for v in state.values()
                      if isinstance(v, torch.Tensor) and v.dim() > 0)
    masters = engine.master_partitions()
    working = {p.data_ptr() for p in params} | ({p.ds_tensor.data_ptr() for p in params} if engine.zero_stage == 3 else set())
    master_bytes = _nbytes(m for m in masters if m.data_ptr() not in working)
    numel = sum(p.ds_numel if engine.zero_stage == 3 else p.numel() for p in params)
    dp = engine.ctx.layout.dp
    grad_elems = numel if engine.zero_stage == 1 else -(-numel // dp)
    grad_bytes = grad_elems * 4  # DeepSpeed reduces and keeps gradients in fp32 for the master step
    return {"parameters": param_bytes, "gradients": grad_bytes, "optimizer": moments + master_bytes}


def report_state_bytes(engine: DeepSpeedEngine, run_dir) -> list[dict[str, int]]:
    """Every rank's bytes, logged by rank 0 and written to <run_dir>/state_bytes.json (collective)."""
    import json

    mine = {"rank": engine.ctx.rank, **engine.ctx.coords, **memory_report(engine)}
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    if engine.ctx.rank == 0:
        for r in reports:
            log.info(f"rank {r['rank']} (dp {r['dp']}, tp {r['tp']}) ZeRO-{engine.zero_stage}: parameters "
                     f"{r['parameters'] / 2**20:.2f} MiB, gradients {r['gradients'] / 2**20:.2f} MiB (ZeRO's share), "
                     f"optimizer states {r['optimizer'] / 2**20:.2f} MiB")
        (run_dir / "state_bytes.json").write_text(json.dumps({"zero_stage": engine.zero_stage, "ranks": reports},
                                                             indent=1) + "\n")
    return reports
