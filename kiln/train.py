"""One training run on this process's rank: build → train → close.

Started by ``kiln train`` inside every torchrun worker (or directly, as a world of one).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import torch.distributed as dist

from kiln.config import RunConfig, dump_config
from kiln.log import setup_logging

log = logging.getLogger("kiln")


def resolve_run_dir(config: RunConfig) -> Path:
    """train.run_dir, or runs/<name>-<timestamp> chosen by rank 0 and shared with every rank."""
    chosen = [config.train.run_dir or f"runs/{config.name}-{datetime.now():%Y%m%d-%H%M%S}"]
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def run(config: RunConfig) -> list[dict]:
    from kiln.data.setup import build_batches
    from kiln.model.builder import build_model, transformer_config
    from kiln.parallel.backend import destroy_parallel, init_parallel
    from kiln.plan.flops import flops_per_token, peak_flops
    from kiln.trainer.loop import Trainer
    from kiln.trainer.optim import build_optimizer, build_scheduler, wrap_ddp
    from kiln.trainer.setup import build_callbacks, finalize_grads_hook

    ctx = init_parallel(config)
    run_dir = resolve_run_dir(config)
    config.train.run_dir = str(run_dir)
    setup_logging(ctx.rank, run_dir / "logs", config.logging.all_ranks)
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")
        log.info(f"run directory: {run_dir.resolve()}")
        log.info("layout: " + ctx.layout.describe(max_groups=4).replace("\n", "\n[kiln]   "))
    batches, vocab_size = build_batches(config, ctx)
    tconfig = transformer_config(config, ctx)
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
        build_callbacks(config, ctx, run_dir),
        flops_per_token=flops_per_token(config.model, vocab_size),
        peak_flops=peak_flops(ctx.device),
    )
    try:
        history = trainer.train()
        if ctx.rank == 0 and history:
            log.info(f"done: {trainer.step} steps, final loss {history[-1]['loss']:.4f}; run directory {run_dir.resolve()}")
    finally:
        trainer.close()
        destroy_parallel()
    return history
