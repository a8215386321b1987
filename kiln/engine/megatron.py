"""The megatron engine: megatron-core DDP, its (distributed) AdamW and its pipeline schedules.

Data parallelism is megatron-core's ``DistributedDataParallel`` (contiguous fp32 gradient
buffers, averaged over dp × cp); the optimizer is ``get_megatron_optimizer`` (with
``optim.distributed_optimizer``, megatron's ZeRO-1); forward/backward runs through the
schedule the layout calls for (no pipelining, 1F1B, or interleaved 1F1B). Every one of them
is handed the run's process groups explicitly (``ctx.pg_collection``), so nothing here reads
megatron-core's global groups.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from kiln.config import OptimConfig, ParallelConfig, TrainConfig
from kiln.engine.base import Engine, PlannedState, RankShare, SavedEngine, StepResult
from kiln.engine.forward import TokenBatches, mean_loss
from kiln.engine import megatron_checkpoint
from kiln.engine.megatron_checkpoint import optimizer_step_count
from kiln.engine.schedule import build_lr_scheduler, load_scheduler_state, scheduler_state
from kiln.errors import KilnConfigError
from kiln.kernels.fp8 import trusted_te_extra_state


def _loss_func(output_tensor: torch.Tensor, cp: int = 1):
    """Mean next-token loss of this rank's tokens of one micro-batch.

    The schedule divides it by the micro-batch count and multiplies it by the CP size (it
    expects the CP-averaged loss, whose gradient on each rank is 1/cp of the local one); DDP
    then averages gradients over dp × cp. Ring attention already sends each key's gradient home,
    so the local mean is divided by cp here to keep the gradient that of the global mean.
    """
    loss = mean_loss(output_tensor)
    return loss / cp, {"lm loss": loss.detach().clone()}  # the schedule scales the first in place


class MegatronEngine(Engine):
    name = "megatron"
    checkpoint_format = "megatron"
    accumulates_main_grad = True
    fp8_backends = ("te", "torchao")

    @classmethod
    def validate(cls, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig) -> None:
        if train.precision == "fp16":
            raise KilnConfigError("train.precision=fp16 needs parallel.engine=deepspeed (its dynamic loss scaler); "
                                  f"the {cls.name} engine trains in bf16 or fp32")
        if parallel.offload_optimizer != "none" or parallel.offload_params != "none":
            raise KilnConfigError(f"parallel.offload_optimizer/offload_params need parallel.engine=deepspeed "
                                  f"(or fsdp, for parameters); the {cls.name} engine does not offload")

    @classmethod
    def hooks_inside_layers(cls, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig) -> str | None:
        if parallel.overlap_param_gather and optim.distributed_optimizer and train.device != "cpu":
            return ("with parallel.overlap_param_gather and optim.distributed_optimizer, megatron-core DDP waits for "
                    "each module's parameter all-gather in forward pre-hooks (on GPUs); set "
                    "parallel.overlap_param_gather=false (parameters are then gathered after the optimizer step)")
        return None

    @classmethod
    def describe(cls, parallel: ParallelConfig) -> str:
        return cls.name

    @classmethod
    def plan_state(cls, share: RankShare, parallel: ParallelConfig, optim: OptimConfig) -> PlannedState:
        """Weights in the training dtype, the contiguous fp32 gradient buffer (grad_reduce_in_fp32), Adam's
        two moments plus fp32 masters of half-precision weights (fp32 runs step the weights themselves),
        sharded over dp × cp by the distributed optimizer, and the routed experts' over expert_dp."""
        n, experts, distributed = share.parameters, share.experts, optim.distributed_optimizer
        shards = share.dp * share.cp if distributed else 1
        expert_shards = share.expert_dp if distributed else 1
        per_param = 8 + (4 if share.half else 0)
        # bytes per parameter over DP: fp32 gradients reduce-scattered (all-reduced: twice that), and the
        # distributed optimizer's all-gather of the updated weights
        gradient_bytes, gather_bytes = (4, share.param_bytes) if distributed else (8, 0)
        # On CPU the gradient buffer is one bucket, and gloo reduce-scatters a copy of it.
        copy = n * 4 if distributed and shards > 1 and share.device_type == "cpu" else 0.0
        sharding = f"{per_param} bytes per parameter"
        if shards > 1 or expert_shards > 1:
            sharding = f"(fp32 masters + 2 moments) over dp×cp = {shards} (distributed optimizer)" + (
                f", routed experts' over expert_dp = {expert_shards}" if experts else "")
        return PlannedState(
            parameters=n * share.param_bytes, gradients=n * 4,
            optimizer=((n - experts) / shards + experts / expert_shards) * per_param, buffers=0.0,
            reduction_copy=copy, gradient_traffic=n * gradient_bytes, parameter_traffic=n * gather_bytes,
            overlapped=parallel.overlap_grad_reduce,
            description=f"megatron-core DDP: {share.param_bytes}-byte weights, fp32 gradient buffer; Adam {sharding}",
            expert_traffic=experts * (gradient_bytes + gather_bytes))

    @classmethod
    def plan_settings(cls, parallel: ParallelConfig, optim: OptimConfig) -> dict[str, Any]:
        return {"distributed_optimizer": optim.distributed_optimizer}

    @classmethod
    def plan_variants(cls) -> list[dict[str, Any]]:
        return [{"parallel.engine": cls.name, "optim.distributed_optimizer": sharded} for sharded in (False, True)]

    @classmethod
    def memory_saving_changes(cls, parallel: ParallelConfig, optim: OptimConfig) -> list[dict[str, Any]]:
        return [] if optim.distributed_optimizer else [{"optim.distributed_optimizer": True}]

    def __init__(self, model_parts: list[torch.nn.Module], **sections) -> None:
        super().__init__(**sections)
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        ctx, o, p = self.ctx, self.optim_config, self.parallel_config
        tconfig = model_parts[0].config
        cuda = ctx.device.type == "cuda"
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            # Overlap needs a second CUDA stream; on CPU (gloo) it would only add hooks.
            overlap_grad_reduce=cuda and p.overlap_grad_reduce,
            overlap_param_gather=cuda and p.overlap_param_gather and o.distributed_optimizer,
            # With pipelines, each chunk's all-gather is launched by the schedule, in stage order.
            align_param_gather=ctx.layout.pp > 1,
            use_distributed_optimizer=o.distributed_optimizer,
            bucket_size=p.ddp_bucket_size or max(40_000_000, 1_000_000 * ctx.layout.dp),
            average_in_collective=cuda,  # gloo has no AVG reduction
        )
        self.models = [
            DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=part, pg_collection=ctx.pg_collection,
                                    # Bucketing only pays off when overlapping communication on a GPU.
                                    disable_bucketing=(index > 0) or not cuda)
            for index, part in enumerate(model_parts)
        ]
        self._overlaps_param_gather = ddp_config.overlap_param_gather
        self._kept_extra_state: list[list[str]] = [[] for _ in self.models]
        bf16 = self.train_config.param_precision == "bf16"
        # megatron-core's default grouping exempts biases and 1-D parameters (norm gains) from weight decay.
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip, bf16=bf16,
                            params_dtype=torch.bfloat16 if bf16 else torch.float32,
                            use_distributed_optimizer=o.distributed_optimizer),
            self.models, pg_collection=ctx.pg_collection, use_gloo_process_groups=False)
        choose_adam_kernel(self.optimizer, fused=cuda)
        self.scheduler = build_lr_scheduler(o, self.train_config.max_steps, self.optimizer)
        # How the schedules finish a step's gradients: all-reduce over dp (and the tied embedding
        # over first/last stage), with the loss scale applied by the optimizer.
        tconfig.finalize_model_grads_func = functools.partial(self._reduce_gradients, finalize_model_grads)
        self._reduction_start = 0.0
        tconfig.grad_scale_func = self.optimizer.scale_loss
        layout = ctx.layout
        self._hand_communication_to_the_schedule(tconfig, ddp_config, layout.pp)
        self._schedule = get_forward_backward_func(pp_size=layout.pp, vp_size=layout.virtual_pp)
        self._schedule_groups: dict[str, Any] = {"pg_collection": ctx.pg_collection}
        if layout.pp > 1:
            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

            self._schedule_groups["p2p_communicator"] = P2PCommunicator(pp_group=ctx.pg_collection.pp, config=tconfig)
        self._batches = TokenBatches(self.model_config.seq_len, ctx)
        self._loss_func = functools.partial(_loss_func, cp=ctx.layout.cp)
        for model in self.models:
            model.train()

    def _hand_communication_to_the_schedule(self, tconfig, ddp_config, pp: int) -> None:
        """What the schedules call so that overlapped reductions and gathers happen once per step.

        With ``overlap_grad_reduce`` a bucket's reduction starts as soon as its gradients are
        ready, so every micro-batch but the last must run under ``no_sync``. With pipelines the
        schedule also starts each chunk's reduction (and, with overlapped parameter gathers,
        each chunk's all-gather) itself, in stage order, as Megatron-LM does.
        """
        def per_chunk(functions):
            return functions[0] if len(functions) == 1 else functions

        if ddp_config.overlap_grad_reduce:
            tconfig.no_sync_func = per_chunk([model.no_sync for model in self.models])
            if pp > 1:
                tconfig.grad_sync_func = per_chunk([model.start_grad_sync for model in self.models])
        if ddp_config.overlap_param_gather and pp > 1:
            tconfig.param_sync_func = per_chunk([model.start_param_sync for model in self.models])

    @property
    def model_parts(self) -> list[torch.nn.Module]:
        return [model.module for model in self.models]

    # -- a step ---------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        inputs, labels, positions, documents = self._batches.split(next(data_iterator))
        return model(inputs, positions, attention_mask=documents, labels=labels), self._loss_func

    def _schedule_args(self, micro_batches, forward_only: bool) -> dict[str, Any]:
        # Every model chunk walks the same micro-batches (interleaved pipelines visit them once per chunk).
        iterators = [iter(micro_batches) for _ in self.models]
        seq_len = self.model_config.seq_len
        return dict(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.models if len(self.models) > 1 else self.models[0],
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=self.train_config.micro_batch_size,
            decoder_seq_length=seq_len,
            forward_only=forward_only,
            **self._schedule_groups,
        )

    def _reduce_gradients(self, finalize_model_grads, *args, **kwargs):
        self._reduction_start = time.perf_counter()  # this rank's own work ends here; waiting for peers begins
        return finalize_model_grads(*args, **kwargs)

    def forward_backward(self, micro_batches) -> StepResult:
        start = time.perf_counter()
        for model in self.models:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = [d["lm loss"] for d in self._schedule(**self._schedule_args(micro_batches, forward_only=False))]
        # One device-to-host copy per step, not one per micro-batch (each would wait for the GPU).
        loss = float(torch.stack(losses).mean()) if losses else None  # only the last stage has losses
        return StepResult(loss=loss, compute_s=self._reduction_start - start)

    def measure_gradients(self, result: StepResult) -> StepResult:
        # megatron-core's optimizer.step() in two halves: this one (grads to the fp32 masters, the
        # global norm), then optimizer_step's (clip by that norm, step). No fp16 here (no overflow check).
        self.optimizer.prepare_grads()
        result.grad_norm = float(self.optimizer.get_grad_norm())
        return result

    def optimizer_step(self, result: StepResult, *, skip: bool = False) -> StepResult:
        if skip:  # gradients are dropped at the next forward_backward (zero_grad_buffer)
            result.skipped = True
            return result
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        self.advance_lr_schedule()
        for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            params = inner.get_parameters()
            if inner.config.clip_grad > 0.0 and params:
                clip_grad_by_total_norm_fp32(params, inner.config.clip_grad, result.grad_norm,
                                             inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.optimizer.step_with_ready_grads()
        return result

    def eval_losses(self, micro_batches) -> list[float]:
        for model in self.models:
            model.eval()
        with torch.no_grad():
            losses = [d["lm loss"] for d in self._schedule(**self._schedule_args(micro_batches, forward_only=True))]
        for model in self.models:
            model.train()
        return torch.stack(losses).tolist() if losses else []

    def state_bytes(self) -> dict[str, int]:
        """Parameters and DDP gradient buffers as allocated; Adam's moments (created at the first
        step) by rule: two fp32 values per element of each master parameter, plus the fp32 master
        copies of bf16 parameters. With the distributed optimizer, masters are this rank's shards."""
        params = sum(p.numel() * p.element_size() for part in self.model_parts for p in part.parameters())
        grads = sum(buffer.grad_data.numel() * buffer.grad_data.element_size()
                    for model in self.models for buffer in model.buffers)
        masters = [p for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                   for group in inner.optimizer.param_groups for p in group["params"]]
        master_elems = sum(p.numel() for p in masters)
        half = self.train_config.precision != "fp32"
        optimizer = master_elems * 8 + (master_elems * 4 if half or self.optim_config.distributed_optimizer else 0)
        return {"parameters": params, "gradients": grads, "optimizer": optimizer}

    # -- checkpoint state -------------------------------------------------------------------
    def sharded_state_dict(self, *, is_loading: bool, saved: SavedEngine | None = None) -> dict[str, Any]:
        if not is_loading and self._overlaps_param_gather:
            self._gather_updated_params()
        state = megatron_checkpoint.sharded_state(self.models, self.optimizer, self.ctx.pg_collection.dp_cp,
                                                  is_loading=is_loading)
        if saved is not None:
            self._kept_extra_state = [drop_unsaved_extra_state(state[f"model{i}"], saved.tensor_keys)
                                      for i in range(len(self.models))]
        return state

    def _gather_updated_params(self) -> None:
        """With overlapped parameter gathers the last update reaches the model's (bf16) weights
        only during the next forward; a checkpoint must not save the weights before it."""
        for model in self.models:
            model.disable_forward_pre_hook(param_sync=True)
            model.enable_forward_pre_hook()

    def load_sharded_state_dict(self, loaded: dict[str, Any], saved: SavedEngine) -> None:
        for index, model in enumerate(self.models):
            own = model.module.state_dict()
            loaded[f"model{index}"].update({name: own[name] for name in self._kept_extra_state[index]})
        with trusted_te_extra_state():  # TE's delayed-scaling FP8 state is a pickle (kiln.kernels.fp8)
            megatron_checkpoint.load_sharded_state(self.models, self.optimizer, loaded)
        choose_adam_kernel(self.optimizer, fused=self.ctx.device.type == "cuda")

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": scheduler_state(self.scheduler), "adam_step": optimizer_step_count(self.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_scheduler_state(self.scheduler, state["scheduler"])


def drop_unsaved_extra_state(model_state: dict[str, Any], saved_keys: frozenset[str]) -> list[str]:
    """Take out of a load request the ``_extra_state`` objects the checkpoint does not hold; return their names.

    Transformer Engine modules carry extra state (their FP8 scaling history) that the local
    spec's modules do not, so a CPU rehearsal's checkpoint has none to give a TE model; the
    modules keep their fresh state, as at the start of a run. (The other way round, a TE
    checkpoint's extra objects are simply not asked for.) Weights are never dropped here: a
    missing weight still fails the load.
    """
    # megatron-core stores an object under "<key>/shard_<offset>_<shape>"
    saved = {key.split("/shard_")[0] for key in saved_keys}
    absent = [name for name, item in model_state.items()
              if name.endswith("_extra_state") and getattr(item, "key", name) not in saved]
    for name in absent:
        del model_state[name]
    return absent


def choose_adam_kernel(optimizer, *, fused: bool) -> None:
    """Run megatron-core's torch AdamW (used when neither TE nor Apex is installed) with torch's
    fused CUDA kernel on GPUs: one launch for all parameters instead of a few per tensor.

    megatron-core builds it without options; torch reads ``fused`` from the parameter group at
    every step, so setting it afterwards is enough. It is set again after a checkpoint load,
    whose parameter groups carry the writer's choice (a CPU rehearsal's is not fused), and the
    fused kernel wants each ``step`` on the parameter's device. TE's and Apex's FusedAdam are
    left alone.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = inner.optimizer
        if type(adam) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        for group in adam.param_groups:
            group.update(fused=fused or None, foreach=False if fused else None)
        if fused:
            for param, state in adam.state.items():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(param.device, torch.float32)


ENGINE = MegatronEngine
