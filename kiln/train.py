"""One training run on this process's rank: build → train → close.

Started by ``kiln train`` inside every torchrun worker (or directly, as a world of one).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path

import torch.distributed as dist

from kiln.config import RunConfig, dump_config
from kiln.log import setup_logging

log = logging.getLogger("kiln")


def default_run_dir(config: RunConfig) -> str:
    """runs/<name>-<id>: the elastic run id under torchrun (stable across restarts), else a timestamp."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or run_id == "none":
        run_id = f"{datetime.now():%Y%m%d-%H%M%S}"
    return f"runs/{config.name}-{run_id}"


def resolve_run_dir(config: RunConfig) -> Path:
    """train.run_dir, or the default chosen by rank 0 and shared with every rank."""
    chosen = [config.train.run_dir or default_run_dir(config)]
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def keep_metrics_through(path: Path, step: int) -> None:
    """On resume, drop metrics.jsonl records past the checkpoint: those steps are re-run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def new_wandb_run_id(config: RunConfig) -> str | None:
    if config.logging.wandb == "disabled":
        return None
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits  # the alphabet of W&B's own run ids
    return "".join(secrets.choice(alphabet) for _ in range(8))


def run(config: RunConfig) -> list[dict]:
    """Train on this rank; resumes from the newest good checkpoint when there is one.

    Raises TrainingPreempted after a stop signal's checkpoint (the CLI exits 75 on it).
    """
    from kiln.checkpoint.manager import CheckpointManager
    from kiln.data.setup import build_batches, build_val_batches
    from kiln.model.builder import build_model, transformer_config
    from kiln.parallel.backend import destroy_parallel, init_parallel
    from kiln.parallel.deepspeed_engine import check_deepspeed_environment
    from kiln.plan.flops import flops_per_token, peak_flops
    from kiln.trainer.loop import Trainer
    from kiln.trainer.optim import build_optimizer, build_scheduler, wrap_ddp
    from kiln.trainer.preemption import PreemptionWatcher
    from kiln.trainer.setup import build_callbacks, finalize_grads_hook

    check_deepspeed_environment(config)
    ctx = init_parallel(config)
    run_dir = resolve_run_dir(config)
    config.train.run_dir = str(run_dir)
    setup_logging(ctx.rank, run_dir / "logs", config.logging.all_ranks)
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")
        log.info(f"run directory: {run_dir.resolve()}")
        log.info("layout: " + ctx.layout.describe(max_groups=4).replace("\n", "\n[kiln]   "))
    checkpointer = CheckpointManager(config, ctx, run_dir)
    checkpointer.prepare()
    resume_from = checkpointer.find_resume_point()  # before building anything: a bad one stops here
    preemption = PreemptionWatcher(ctx.device) if config.checkpoint.save_on_signal else None
    trainer = batches = None
    try:
        batches, vocab_size = build_batches(config, ctx)
        tconfig = transformer_config(config, ctx)
        deepspeed = None
        if config.parallel.engine == "deepspeed":
            from kiln.parallel.deepspeed_engine import DeepSpeedEngine, report_state_bytes

            deepspeed = DeepSpeedEngine(config, ctx, build_model(config, ctx, vocab_size, tconfig)[0])
            models, optimizer = [deepspeed.module], deepspeed.optimizer
            report_state_bytes(deepspeed, run_dir)
        else:
            models = wrap_ddp(config, build_model(config, ctx, vocab_size, tconfig), tconfig, ctx)
            optimizer = build_optimizer(config, models)
            finalize_grads_hook(tconfig, optimizer)
        trainer = Trainer(
            config,
            ctx,
            models,
            optimizer,
            build_scheduler(config, optimizer),
            batches,
            callbacks=[],
            flops_per_token=flops_per_token(config.model, vocab_size),
            peak_flops=peak_flops(ctx.device),
            checkpointer=checkpointer,
            preemption=preemption,
            val_batches=build_val_batches(config, ctx),
            deepspeed=deepspeed,
        )
        meta = checkpointer.load(resume_from, trainer) if resume_from is not None else {}
        trainer.wandb_run_id = meta.get("wandb_run_id") or (new_wandb_run_id(config) if ctx.rank == 0 else None)
        if ctx.rank == 0 and resume_from is not None:
            keep_metrics_through(run_dir / "metrics.jsonl", trainer.step)
        trainer.callbacks = build_callbacks(config, ctx, run_dir, trainer.wandb_run_id)
        history = trainer.train()
        if ctx.rank == 0 and history:
            log.info(f"done: {trainer.step} steps, final loss {history[-1]['loss']:.4f}; run directory {run_dir.resolve()}")
    finally:
        if trainer is not None:
            trainer.close()
        if batches is not None:
            batches.close()
        checkpointer.close()
        if preemption is not None:
            preemption.close()
        destroy_parallel()
    return history
