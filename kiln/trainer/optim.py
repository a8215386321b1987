"""AdamW through megatron-core's optimizer (plain or distributed) and the LR schedule."""

from __future__ import annotations

import torch

from kiln.config import RunConfig

# kiln's schedule names → megatron-core OptimizerParamScheduler decay styles.
_DECAY_STYLE = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}


def wrap_ddp(config: RunConfig, models: list[torch.nn.Module], tconfig, ctx) -> list[torch.nn.Module]:
    """megatron-core DDP: contiguous fp32 grad buffers, gradients averaged over dp × cp."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=config.optim.distributed_optimizer,
        average_in_collective=ctx.device.type == "cuda",  # gloo has no AVG reduction
    )
    return [
        DistributedDataParallel(
            config=tconfig,
            ddp_config=ddp_config,
            module=model,
            # Bucketing only pays off when overlapping communication on a GPU.
            disable_bucketing=(index > 0) or ctx.device.type != "cuda",
        )
        for index, model in enumerate(models)
    ]


def build_optimizer(config: RunConfig, models: list[torch.nn.Module]):
    """megatron-core AdamW over the DDP-wrapped chunks.

    megatron-core's default parameter grouping already exempts biases and 1-D parameters
    (the RMSNorm gains) from weight decay.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = config.optim
    bf16 = config.train.precision == "bf16"
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.grad_clip,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.distributed_optimizer,
    )
    return get_megatron_optimizer(optimizer_config, models)


def build_scheduler(config: RunConfig, optimizer):
    """Warmup, then cosine / linear / constant / warmup-stable-decay, per optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = config.optim
    decay_steps = o.decay_steps if o.decay_steps is not None else max(config.train.max_steps - o.warmup_steps, 1)
    total = o.warmup_steps + decay_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=total,
        lr_decay_style=_DECAY_STYLE[o.schedule],
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, round(o.wsd_decay_fraction * decay_steps)) if o.schedule == "wsd" else None,
        lr_wsd_decay_style="cosine" if o.schedule == "wsd" else None,
    )
