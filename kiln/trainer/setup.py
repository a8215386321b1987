"""Wiring between megatron-core's schedules and kiln's optimizer and metric sinks."""

from __future__ import annotations

from pathlib import Path

from kiln.config import RunConfig
from kiln.parallel.backend import ParallelContext
from kiln.trainer.callbacks import Callback, ConsoleLogger, JsonlLogger, WandbLogger


def finalize_grads_hook(tconfig, optimizer) -> None:
    """Tell megatron-core's schedules how to finish a step's gradients.

    ``finalize_model_grads`` all-reduces gradients over data parallel (and the tied
    embedding over first/last pipeline stages); ``scale_loss`` applies the loss scale.
    """
    from megatron.core.distributed import finalize_model_grads

    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss


def build_callbacks(config: RunConfig, ctx: ParallelContext, run_dir: Path, wandb_run_id: str | None) -> list[Callback]:
    if ctx.rank != 0:
        return []
    callbacks: list[Callback] = [ConsoleLogger(config.train.max_steps), JsonlLogger(run_dir / "metrics.jsonl")]
    if config.logging.wandb != "disabled":
        callbacks.append(
            WandbLogger(
                mode=config.logging.wandb,
                project=config.logging.wandb_project,
                entity=config.logging.wandb_entity,
                name=run_dir.name,
                run_dir=run_dir,
                config=config.to_dict(),
                run_id=wandb_run_id,
            )
        )
    return callbacks
