"""The megatron engine: megatron-core DDP, its (distributed) AdamW and its pipeline schedules.

Data parallelism is megatron-core's ``DistributedDataParallel`` (contiguous fp32 gradient
buffers, averaged over dp × cp); the optimizer is ``get_megatron_optimizer`` (with
``optim.distributed_optimizer``, megatron's ZeRO-1); forward/backward runs through the
schedule the layout calls for (no pipelining, 1F1B, or interleaved 1F1B). Every one of them
is handed the run's process groups explicitly (``ctx.pg_collection``), so nothing here reads
megatron-core's global groups.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.config import OptimConfig, ParallelConfig, TrainConfig
from kiln.engine.base import Engine, SavedEngine, StepResult
from kiln.engine.forward import TokenBatches, mean_loss
from kiln.engine import megatron_checkpoint
from kiln.engine.megatron_checkpoint import optimizer_step_count
from kiln.engine.schedule import build_lr_scheduler, load_scheduler_state, scheduler_state
from kiln.errors import KilnConfigError


def _loss_func(output_tensor: torch.Tensor):
    """Mean next-token loss of one micro-batch; the schedule divides by the micro-batch count."""
    loss = mean_loss(output_tensor)
    return loss, {"lm loss": loss.detach().clone()}  # the schedule scales `loss` in place


class MegatronEngine(Engine):
    name = "megatron"
    checkpoint_format = "megatron"

    @classmethod
    def validate(cls, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig) -> None:
        if train.precision == "fp16":
            raise KilnConfigError("train.precision=fp16 needs parallel.engine=deepspeed (its dynamic loss scaler); "
                                  f"the {cls.name} engine trains in bf16 or fp32")
        if parallel.offload_optimizer != "none" or parallel.offload_params != "none":
            raise KilnConfigError(f"parallel.offload_optimizer/offload_params need parallel.engine=deepspeed "
                                  f"(or fsdp, for parameters); the {cls.name} engine does not offload")

    @classmethod
    def describe(cls, parallel: ParallelConfig) -> str:
        return cls.name

    def __init__(self, model_parts: list[torch.nn.Module], **sections) -> None:
        super().__init__(**sections)
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        ctx, o = self.ctx, self.optim_config
        tconfig = model_parts[0].config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=o.distributed_optimizer,
            average_in_collective=ctx.device.type == "cuda",  # gloo has no AVG reduction
        )
        self.models = [
            DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=part, pg_collection=ctx.pg_collection,
                                    # Bucketing only pays off when overlapping communication on a GPU.
                                    disable_bucketing=(index > 0) or ctx.device.type != "cuda")
            for index, part in enumerate(model_parts)
        ]
        bf16 = self.train_config.precision == "bf16"
        # megatron-core's default grouping exempts biases and 1-D parameters (norm gains) from weight decay.
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip, bf16=bf16,
                            params_dtype=torch.bfloat16 if bf16 else torch.float32,
                            use_distributed_optimizer=o.distributed_optimizer),
            self.models, pg_collection=ctx.pg_collection, use_gloo_process_groups=False)
        self.scheduler = build_lr_scheduler(o, self.train_config.max_steps, self.optimizer)
        # How the schedules finish a step's gradients: all-reduce over dp (and the tied embedding
        # over first/last stage), with the loss scale applied by the optimizer.
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.grad_scale_func = self.optimizer.scale_loss
        layout = ctx.layout
        self._schedule = get_forward_backward_func(pp_size=layout.pp, vp_size=layout.virtual_pp)
        self._schedule_groups: dict[str, Any] = {"pg_collection": ctx.pg_collection}
        if layout.pp > 1:
            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

            self._schedule_groups["p2p_communicator"] = P2PCommunicator(pp_group=ctx.pg_collection.pp, config=tconfig)
        self._batches = TokenBatches(self.model_config.seq_len, ctx.device)
        for model in self.models:
            model.train()

    @property
    def model_parts(self) -> list[torch.nn.Module]:
        return [model.module for model in self.models]

    # -- a step ---------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        inputs, labels, positions = self._batches.split(next(data_iterator))
        return model(inputs, positions, attention_mask=None, labels=labels), _loss_func

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

    def forward_backward(self, micro_batches) -> StepResult:
        for model in self.models:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = [float(d["lm loss"]) for d in self._schedule(**self._schedule_args(micro_batches, forward_only=False))]
        return StepResult(loss=sum(losses) / len(losses) if losses else None)  # only the last stage has losses

    def optimizer_step(self, result: StepResult, *, skip: bool = False) -> StepResult:
        if skip:  # gradients are dropped at the next forward_backward (zero_grad_buffer)
            result.skipped = True
            return result
        self.scheduler.step(increment=1)  # the LR of step k is schedule(k)
        _, grad_norm, _ = self.optimizer.step()
        result.grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return result

    def eval_losses(self, micro_batches) -> list[float]:
        for model in self.models:
            model.eval()
        with torch.no_grad():
            losses = [float(d["lm loss"]) for d in self._schedule(**self._schedule_args(micro_batches, forward_only=True))]
        for model in self.models:
            model.train()
        return losses

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
        return megatron_checkpoint.sharded_state(self.models, self.optimizer, self.ctx.pg_collection.dp_cp,
                                                 is_loading=is_loading)

    def load_sharded_state_dict(self, loaded: dict[str, Any], saved: SavedEngine) -> None:
        megatron_checkpoint.load_sharded_state(self.models, self.optimizer, loaded)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": scheduler_state(self.scheduler), "adam_step": optimizer_step_count(self.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_scheduler_state(self.scheduler, state["scheduler"])


ENGINE = MegatronEngine
