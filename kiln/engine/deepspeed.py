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
written with: :mod:`kiln.engine.portable_state` writes every parameter and its Adam moments as
whole (TP-sharded) tensors, so a ZeRO checkpoint loads at any DP size, ZeRO stage or TP size,
into the fsdp engine too, with no conversion step.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from kiln.config import OptimConfig, ParallelConfig, TrainConfig
from kiln.engine import portable_state
from kiln.engine.base import Engine, PlannedState, RankShare, SavedEngine, StepResult
from kiln.engine.flat_shards import FlatShare
from kiln.engine.forward import TokenBatches, mean_loss
from kiln.plan.memory import ZERO_K, zero_model_state_bytes
from kiln.engine.schedule import build_lr_scheduler, load_scheduler_state, param_groups, scheduler_state
from kiln.errors import KilnConfigError, KilnEnvironmentError

log = logging.getLogger("kiln")
REDUCE_BUCKET = 50_000_000  # elements: ZeRO allocates this gradient bucket whole, however small the model
MAX_REUSE_DISTANCE = 1_000_000_000  # ZeRO-3 keeps a gathered parameter whose next use is nearer than this


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
    """megatron-core's process groups (from the parallel context) under the names DeepSpeed's
    ``mpu`` argument expects.

    Model parallelism is tensor parallelism here (the engine has no pipeline), and DeepSpeed's
    data-parallel group is megatron-core's, so ZeRO shards over DP ranks only.
    """

    def __init__(self, pg_collection) -> None:
        self._groups = pg_collection

    def get_model_parallel_group(self):
        return self._groups.tp

    def get_model_parallel_rank(self) -> int:
        return self._groups.tp.rank()

    def get_model_parallel_world_size(self) -> int:
        return self._groups.tp.size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self._groups.tp)[0]

    def get_data_parallel_group(self):
        return self._groups.dp

    def get_data_parallel_rank(self) -> int:
        return self._groups.dp.rank()

    def get_data_parallel_world_size(self) -> int:
        return self._groups.dp.size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._groups.dp)

    def get_pipeline_model_parallel_group(self):
        return self._groups.pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _offload(where: str, parallel: ParallelConfig, cuda: bool) -> dict[str, Any]:
    target: dict[str, Any] = {"device": where, "pin_memory": cuda}
    if where == "nvme":
        target["nvme_path"] = parallel.nvme_path
    return target


def deepspeed_config(parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig, extra: dict[str, Any] | None,
                     dp_size: int, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config of a kiln run; ``extra`` (the run config's ``deepspeed:``) is merged over it."""
    p, t = parallel, train
    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)
    zero: dict[str, Any] = {
        "stage": p.zero_stage,
        "contiguous_gradients": True,
        # Overlap needs a side stream; on CPU it only adds copies.
        "overlap_comm": cuda,
        "reduce_scatter": True,
        "reduce_bucket_size": REDUCE_BUCKET,
        "allgather_bucket_size": 50_000_000,
    }
    if p.zero_stage == 3:
        # Keep small parameters (norm gains) whole on every rank; below this many elements a
        # gather costs more than the memory it saves.
        zero.update({"stage3_param_persistence_threshold": 10_000, "stage3_max_live_parameters": 1_000_000_000,
                     "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_reuse_distance": MAX_REUSE_DISTANCE,
                     "stage3_gather_16bit_weights_on_model_save": False})
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(p.offload_optimizer, p, cuda)
    if p.offload_params != "none":
        zero["offload_param"] = _offload(p.offload_params, p, cuda)
    generated = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.param_precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # kiln builds the optimizer (torch AdamW, or DeepSpeed's CPU Adam when offloading).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # kiln logs the metrics
        "wall_clock_breakdown": False,
    }
    return _merge(generated, extra or {})


def build_optimizer(optim: OptimConfig, offload_optimizer: str, model: torch.nn.Module,
                    cuda: bool) -> torch.optim.Optimizer:
    groups = param_groups([model], optim.weight_decay)
    kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay)
    if offload_optimizer != "none":
        # ZeRO-Offload steps on the CPU; DeepSpeed's vectorised Adam is several times torch's there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=cuda, **kwargs)


class DeepSpeedEngine(Engine):
    """One rank's DeepSpeed engine around the megatron-core model."""

    name = "deepspeed"
    # DeepSpeed's own MoE (deepspeed.moe) is a different layer with its own groups and checkpoints.
    moe_support = ("kiln's MoE layers are megatron-core's, whose expert-parallel gradient reduction and "
                   "optimizer groups live in megatron-core DDP, which this engine replaces")
    grad_norm_before_update = False  # DeepSpeed computes it inside engine.step(), with the update
    can_skip_update = False  # engine.step() is the only way through a gradient-accumulation boundary
    checkpoint_format = "portable"
    reads_formats = ("megatron",)
    options_section = "deepspeed"

    @classmethod
    def validate(cls, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise KilnConfigError(message)

        p = parallel
        check(p.zero_stage in (1, 2, 3), f"parallel.zero_stage must be 1, 2 or 3, got {p.zero_stage}")
        check(p.pp == 1 and p.virtual_pp in (None, 1),
              f"parallel.pp={p.pp}: the deepspeed engine does not run pipeline parallelism (DeepSpeed's own "
              "pipeline engine cannot drive megatron-core's model); use parallel.engine=megatron for pp > 1, "
              "or set parallel.pp=1 and shard with parallel.zero_stage instead")
        check(p.cp == 1,
              f"parallel.cp={p.cp} with parallel.engine=deepspeed: DeepSpeed averages gradients over its "
              "data-parallel group only, and context-parallel ranks hold partial gradients of the same "
              "samples; use parallel.engine=megatron for context parallelism")
        check(not p.sequence_parallel,
              "parallel.sequence_parallel with parallel.engine=deepspeed: the norm gradients it leaves partial "
              "over the TP group are reduced by megatron-core DDP, which DeepSpeed replaces; set "
              "parallel.sequence_parallel=false (or use parallel.engine=megatron)")
        check(p.offload_params == "none" or p.zero_stage == 3,
              f"parallel.offload_params={p.offload_params} needs parallel.zero_stage=3 (only ZeRO-3 partitions "
              "parameters)")
        check("nvme" not in (p.offload_optimizer, p.offload_params) or bool(p.nvme_path),
              "offload to nvme needs parallel.nvme_path (a directory on a local NVMe drive)")
        check(not optim.distributed_optimizer,
              "optim.distributed_optimizer is megatron's ZeRO-1; with parallel.engine=deepspeed the optimizer is "
              "sharded by parallel.zero_stage: set optim.distributed_optimizer=false")

    @classmethod
    def check_environment(cls, parallel: ParallelConfig, train: TrainConfig, device_type: str) -> None:
        if device_type == "cpu" and train.precision == "fp16":
            supported = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)()
            if not supported:
                raise KilnEnvironmentError(
                    "train.precision=fp16 on this CPU: it has no fp16 kernels (DeepSpeed's CPU accelerator "
                    "refuses it); use train.precision=bf16 or fp32 here, fp16 on a GPU")

    @classmethod
    def hooks_inside_layers(cls, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig) -> str | None:
        if parallel.zero_stage == 3:
            return ("ZeRO-3 gathers each submodule's parameters in its own hooks; set parallel.zero_stage=1 or 2, "
                    "or use parallel.engine=fsdp (its hooks wrap whole layers)")
        return None

    @classmethod
    def plan_state(cls, share: RankShare, parallel: ParallelConfig, optim: OptimConfig) -> PlannedState:
        """ZeRO's accounting (Rajbhandari et al. 2020) with DeepSpeed's bytes: fp32 master partitions
        even in fp32 (K = 12), gradients reduced and kept in fp32, the whole reduce bucket allocated
        however small the model, and ZeRO-3's gathered parameters kept from forward to backward
        while their reuse is within stage3_max_reuse_distance."""
        n, dp, stage, pb = share.parameters, share.dp, parallel.zero_stage, share.param_bytes
        weights, _, optimizer = zero_model_state_bytes(n, dp, stage, k=ZERO_K, param_bytes=pb)
        if parallel.offload_optimizer != "none":
            optimizer = 0.0
        if parallel.offload_params != "none":
            weights = 0.0
        gathered = 0.0
        if stage == 3:
            gathered = (n if n <= MAX_REUSE_DISTANCE else 2 * share.per_layer) * pb
        return PlannedState(
            parameters=weights, gradients=n * 4 / (dp if stage >= 2 else 1), optimizer=optimizer,
            buffers=gathered + REDUCE_BUCKET * pb, reduction_copy=0.0,
            gradient_traffic=n * 4 * (2 if stage == 1 else 1), parameter_traffic=n * pb * (2 if stage == 3 else 1),
            overlapped=True, description=f"DeepSpeed ZeRO-{stage} over dp = {dp} (K = {ZERO_K}, fp32 gradients)")

    @classmethod
    def plan_settings(cls, parallel: ParallelConfig, optim: OptimConfig) -> dict[str, Any]:
        return {"zero_stage": parallel.zero_stage, "offload_optimizer": parallel.offload_optimizer,
                "offload_params": parallel.offload_params}

    @classmethod
    def plan_variants(cls) -> list[dict[str, Any]]:
        return [{"parallel.engine": cls.name, "parallel.zero_stage": stage, "optim.distributed_optimizer": False}
                for stage in (1, 2, 3)]

    @classmethod
    def memory_saving_changes(cls, parallel: ParallelConfig, optim: OptimConfig) -> list[dict[str, Any]]:
        return [{"parallel.zero_stage": stage} for stage in range(parallel.zero_stage + 1, 4)]

    @classmethod
    def describe(cls, parallel: ParallelConfig) -> str:
        offload = [f"{what} → {where}" for what, where in (("optimizer", parallel.offload_optimizer),
                                                          ("params", parallel.offload_params)) if where != "none"]
        return f"{cls.name} (ZeRO-{parallel.zero_stage}{', offload ' + ', '.join(offload) if offload else ''})"

    def __init__(self, model_parts: list[torch.nn.Module], *, options: dict[str, Any] | None = None, **sections) -> None:
        super().__init__(**sections)
        ctx = self.ctx
        use_cpu_accelerator(ctx.device)
        import deepspeed

        (model,) = model_parts
        cuda = ctx.device.type == "cuda"
        p = self.parallel_config
        ds_config = deepspeed_config(p, self.optim_config, self.train_config, options, ctx.layout.dp, cuda)
        optimizer = build_optimizer(self.optim_config, p.offload_optimizer, model, cuda)
        self.checkpoint_template = portable_state.checkpoint_template(model)  # before ZeRO-3 partitions it
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, mpu=MegatronGroups(ctx.pg_collection),
            dist_init_required=False)
        self.module = self.engine.module
        self.zero_stage = self.engine.zero_optimization_stage()
        self.base_optimizer = self.optimizer.optimizer  # the torch/CPU Adam over ZeRO's flat partitions
        init_adam_state(self.base_optimizer, self.master_partitions())
        self.scheduler = build_lr_scheduler(self.optim_config, self.train_config.max_steps, self.optimizer)
        self._batches = TokenBatches(self.model_config.seq_len, ctx)

    @property
    def model_parts(self) -> list[torch.nn.Module]:
        return [self.module]

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master partitions, the tensors the base Adam steps (and keys its state by)."""
        if self.zero_stage == 3:
            return list(self.optimizer.fp32_partitioned_groups_flat)  # stage 3 hands them to Adam per step
        return list(self.optimizer.single_partition_of_fp32_groups)

    # -- a step ---------------------------------------------------------------------------
    def _token_losses(self, batch) -> torch.Tensor:
        inputs, labels, positions, documents = self._batches.split(batch)
        return self.engine(inputs, positions, attention_mask=documents, labels=labels)  # [b, s]

    def forward_backward(self, micro_batches) -> StepResult:
        """Forward/backward every micro-batch; DeepSpeed accumulates and applies the update at the
        last micro-batch's ``engine.step()``, which :meth:`optimizer_step` makes."""
        losses = []
        for index, batch in enumerate(micro_batches):
            loss = mean_loss(self._token_losses(batch))
            self.engine.backward(loss)
            if index < len(micro_batches) - 1:
                self.engine.step()  # not a boundary: only counts the micro-step
            losses.append(loss.detach())
        return StepResult(loss=float(torch.stack(losses).mean()))

    def optimizer_step(self, result: StepResult, *, skip: bool = False) -> StepResult:
        if skip:
            from kiln.errors import KilnError

            raise KilnError("the deepspeed engine cannot skip an update (DeepSpeed applies it inside engine.step); "
                            "use parallel.engine=megatron or fsdp with a callback that skips steps")
        self.advance_lr_schedule()
        self.engine.step()
        if not self.engine.was_step_applied():
            # fp16 overflow: DeepSpeed skipped the update and lowered the loss scale; the
            # schedule stays where it was, as DeepSpeed's own schedulers do.
            self.scheduler.step(increment=-1)
            result.skipped = True
        grad_norm = self.engine.get_global_grad_norm()
        result.grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if self.train_config.precision == "fp16":
            result.loss_scale = float(self.optimizer.cur_scale)
        return result

    def eval_losses(self, micro_batches) -> list[float]:
        self.engine.eval()
        with torch.no_grad():
            losses = [float(mean_loss(self._token_losses(batch))) for batch in micro_batches]
        self.engine.train()
        return losses

    def state_bytes(self) -> dict[str, int]:
        return memory_report(self)

    # -- checkpoint state -------------------------------------------------------------------
    def sharded_state_dict(self, *, is_loading: bool, saved: SavedEngine | None = None) -> dict[str, Any]:
        lazy_link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if lazy_link is not None:  # ZeRO-1/2 link moments to parameters at the first step; a save or load may come first
            lazy_link()
        return portable_state.sharded_state(
            self.checkpoint_template, dict(self.module.named_parameters()), self._local_share,
            half=self.train_config.precision != "fp32", is_loading=is_loading, rank=self.ctx.rank,
            common={} if is_loading else self._common_state(), request=portable_state.request_for(saved))

    def _local_share(self, key: str, param: torch.nn.Parameter) -> FlatShare | None:
        """This rank's range of a parameter's fp32 master and moments, as views of ZeRO's partitions."""
        if self.zero_stage == 3:
            return self._zero3_share(param)
        fragment = getattr(param, "_hp_mapping", None)  # ZeRO-1/2: None where this rank holds none of it
        if fragment is None:
            return None
        tensors = {"master": fragment.get_hp_fragment(),
                   **{name: fragment.get_hp_fragment(name) for name in portable_state.MOMENTS}}
        return FlatShare(fragment.lp_fragment_address.start, tensors)

    def _zero3_share(self, param: torch.nn.Parameter) -> FlatShare | None:
        """ZeRO-3 keeps slice ``rank`` of each flattened parameter (the last one padded)."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        zero3, size = self.optimizer, param.ds_tensor.ds_numel
        start = dist.get_rank(group=param.ds_process_group) * size
        count = min(param.ds_numel, start + size) - start
        if count <= 0:
            return None
        local = {"master": zero3.get_local_fp32_param(param),
                 **{name: zero3.get_local_fp32_param(param, name) for name in portable_state.MOMENTS}}
        if zero3.swap_optimizer:  # NVMe: the buffers it swapped the partition into are reused next call
            local = {name: value.clone() for name, value in local.items()}

        def store() -> None:  # a no-op copy where ``local`` are views of the partitions themselves
            safe_set_local_fp32_param(param, local["master"])
            for name in portable_state.MOMENTS:
                safe_set_local_optimizer_state(param, local[name], name)

        return FlatShare(start, {name: value[:count] for name, value in local.items()}, store)

    def _common_state(self) -> dict[str, Any]:
        steps = {int(state["step"]) for state in self.base_optimizer.state.values() if "step" in state}
        state: dict[str, Any] = {"adam_step": max(steps) if steps else 0, "zero_stage": self.zero_stage}
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if self.train_config.precision == "fp16" and scaler is not None:
            state["loss_scaler"] = {k: getattr(scaler, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter",
                                                                    "cur_hysteresis") if hasattr(scaler, k)}
        return state

    def load_sharded_state_dict(self, loaded: dict[str, Any], saved: SavedEngine) -> None:
        """The loaded ranges are in ZeRO's partitions (master weights, moments); the working
        weights follow from the masters."""
        portable_state.finish_load(loaded)
        self._masters_to_working_weights()
        common = portable_state.loaded_common(loaded, saved.state, saved.step)
        for state in self.base_optimizer.state.values():
            step = state["step"]
            state["step"] = step.fill_(common["adam_step"]) if isinstance(step, torch.Tensor) else common["adam_step"]
        scaler = getattr(self.optimizer, "loss_scaler", None)
        for attr, value in common.get("loss_scaler", {}).items():
            setattr(scaler, attr, value)

    def _masters_to_working_weights(self) -> None:
        opt = self.optimizer
        if self.zero_stage == 3:
            for group in range(len(opt.fp16_groups)):
                opt._reassign_or_swap_out_partitioned_parameters(group)
        else:
            opt.update_lp_params()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": scheduler_state(self.scheduler), "zero_stage": self.zero_stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_scheduler_state(self.scheduler, state["scheduler"])


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
    module = engine.module
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


ENGINE = DeepSpeedEngine
