"""The LR schedule every engine follows: megatron-core's OptimizerParamScheduler over the
optimizer's param groups (any torch-style optimizer), stepped once per applied update."""

from __future__ import annotations

from kiln.config import OptimConfig

# kiln's schedule names → megatron-core OptimizerParamScheduler decay styles.
_DECAY_STYLE = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}


def build_lr_scheduler(optim: OptimConfig, max_steps: int, optimizer):
    """Warmup, then cosine / linear / constant / warmup-stable-decay, per optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = optim.decay_steps if optim.decay_steps is not None else max(max_steps - optim.warmup_steps, 1)
    total = optim.warmup_steps + decay_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=total,
        lr_decay_style=_DECAY_STYLE[optim.schedule],
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, round(optim.wsd_decay_fraction * decay_steps)) if optim.schedule == "wsd" else None,
        lr_wsd_decay_style="cosine" if optim.schedule == "wsd" else None,
    )


def scheduler_state(scheduler) -> dict[str, int]:
    return {"num_steps": int(scheduler.num_steps)}


def load_scheduler_state(scheduler, state: dict[str, int]) -> None:
    """The schedule's shape comes from the run's config (so max_steps can be extended on resume);
    only its position comes from the checkpoint. step(0) re-applies LR and weight decay."""
    scheduler.num_steps = int(state["num_steps"])
    scheduler.step(increment=0)


def param_groups(model_parts, weight_decay: float) -> list[dict]:
    """Decay matrices, not norms or biases: megatron-core's grouping, for torch optimizers."""
    decay, no_decay = [], []
    for part in model_parts:
        for name, param in part.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.dim() == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]
