"""One training run on this process's rank: build → train → close.

Started by ``kiln train`` inside every torchrun worker (or directly, as a world of one).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path

from kiln.config import RunConfig, dump_config
from kiln.log import setup_logging

log = logging.getLogger("kiln")


def default_run_dir(config: RunConfig) -> str:
    """runs/<name>-<id>: the elastic run id under torchrun (stable across restarts), else a timestamp."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or run_id == "none":
        run_id = f"{datetime.now():%Y%m%d-%H%M%S}"
    return f"runs/{config.name}-{run_id}"


def check_environment(config: RunConfig) -> str:
    """Stop, before any process builds anything, when this machine cannot run the config (a missing
    GPU, library or capability): the CLI calls it before launching workers, each worker again.
    Returns the device type the run uses."""
    from kiln.engine import engine_class
    from kiln.parallel.backend import resolve_device

    device_type = resolve_device(config.train.device)
    engine_class(config.parallel.engine).check_environment(config.parallel, config.train, device_type)
    if config.train.precision == "fp8":
        from kiln.kernels.fp8 import check_fp8_environment

        check_fp8_environment(config.fp8, device_type)
    from kiln.kernels.attention import choose_backend

    choose_backend(config.kernels.attention, device_type, documents=config.data.reset_attention_at_eos,
                   cp=config.parallel.cp, precision=config.train.precision)
    return device_type


def build_run_model(config: RunConfig, ctx, vocab_size: int) -> list:
    """This rank's model chunks as the run config describes them (kernels, FP8, document masks)."""
    from kiln.model.builder import build_model

    return build_model(config.model, config.parallel, config.train, ctx, vocab_size, kernels=config.kernels,
                       fp8=config.fp8, documents=config.data.reset_attention_at_eos)


def build_run_engine(config: RunConfig, ctx, vocab_size: int, model_parts: list | None = None):
    """This rank's model parts, wrapped in the configured engine: the one place an engine is assembled.

    ``model_parts``: parts from :func:`build_run_model` whose weights the caller has set (``kiln eval``
    loads a checkpoint's, ``kiln ckpt import`` a Hugging Face model's) before the engine wraps them,
    so every engine's master weights and sharding start from those; None builds them here."""
    from kiln.engine import build_engine

    options = config.engine_options()
    if model_parts is None:
        model_parts = build_run_model(config, ctx, vocab_size)
    return build_engine(config.parallel.engine, model_parts,
                        model=config.model, optim=config.optim, parallel=config.parallel, train=config.train, ctx=ctx,
                        **({"options": options} if options else {}))


def build_guard(config: RunConfig, rank: int, run_dir: Path) -> list:
    """The loss-spike guard, unless guard.policy=disabled."""
    from kiln.engine import engine_class
    from kiln.trainer.guard import LossGuard, resolve_policy

    policy = resolve_policy(config.guard, engine_class(config.parallel.engine))
    return [] if policy == "disabled" else [LossGuard(config.guard, policy=policy, rank=rank, run_dir=run_dir)]


def report_state_bytes(engine, ctx, run_dir: Path) -> None:
    """Every rank's parameter, gradient and optimizer-state bytes: logged by rank 0 and written to
    <run_dir>/state_bytes.json (collective)."""
    from kiln.parallel import collectives

    layout = ctx.layout
    experts = layout.expert_coords(ctx.rank) if layout.splits_experts else {}
    reports = collectives.all_gather_object({"rank": ctx.rank, **ctx.coords, **experts, **engine.state_bytes()})
    if ctx.rank == 0:
        for r in reports:
            where = f"dp {r['dp']}, tp {r['tp']}, pp {r['pp']}" + (f", cp {r['cp']}" if layout.cp > 1 else "")
            if experts:
                where += f"; experts: ep {r['ep']}, expert_tp {r['expert_tp']}, expert_dp {r['expert_dp']}"
            log.info(f"rank {r['rank']} ({where}): parameters "
                     f"{r['parameters'] / 2**20:.2f} MiB, gradients {r['gradients'] / 2**20:.2f} MiB, "
                     f"optimizer states {r['optimizer'] / 2**20:.2f} MiB")
        description = engine.describe(engine.parallel_config)
        (run_dir / "state_bytes.json").write_text(json.dumps({"engine": description, "ranks": reports}, indent=1) + "\n")


def run(config: RunConfig) -> list[dict]:
    """Train on this rank; resumes from the newest good checkpoint when there is one.

    Raises TrainingPreempted after a stop signal's checkpoint (the CLI exits 75 on it).
    """
    from kiln.checkpoint.manager import CheckpointManager
    from kiln.data.setup import build_batches, build_val_batches
    from kiln.parallel import collectives
    from kiln.parallel.backend import destroy_parallel, init_parallel, worker_environment
    from kiln.plan.flops import flops_per_token, peak_for
    from kiln.plan.planner import MEMORY_CHECKED, check_memory_in_worker
    from kiln.trainer.callbacks import build_callbacks
    from kiln.trainer.garbage import ScheduledGarbageCollection
    from kiln.trainer.loop import Trainer
    from kiln.trainer.preemption import PreemptionWatcher
    from kiln.trainer.routing import RoutingMetrics
    from kiln.trainer.watchdog import HangWatchdog

    # For runs not started by the CLI.
    os.environ.update(worker_environment(config.parallel, config.train.device, config.train.run_dir))
    check_environment(config)
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    if ctx.device.type == "cuda":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.train.tf32
    peak, peak_note = peak_for(ctx.device, config.train.precision, config.train.peak_tflops)
    run_dir = Path(collectives.broadcast_object(config.train.run_dir or default_run_dir(config)))
    config.train.run_dir = str(run_dir)
    setup_logging(ctx.rank, run_dir / "logs", config.logging.all_ranks)
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")
        log.info(f"run directory: {run_dir.resolve()}")
        log.info("layout: " + ctx.layout.describe(max_groups=4).replace("\n", "\n[kiln]   "))
        log.info(peak_note)
    checkpointer = CheckpointManager(config.checkpoint, ctx, run_dir, config.model, config.to_dict())
    checkpointer.prepare()
    resume_from = checkpointer.find_resume_point()  # before building anything: a bad one stops here
    preemption = PreemptionWatcher() if config.checkpoint.save_on_signal else None
    trainer = batches = engine = None
    try:
        batches, vocab_size = build_batches(config.data, config.train, config.model, ctx)
        if not os.environ.get(MEMORY_CHECKED):  # no launcher checked it (torchrun or srun started us)
            check_memory_in_worker(config, ctx.layout.world_size, vocab_size, ctx.device)
        engine = build_run_engine(config, ctx, vocab_size)
        report_state_bytes(engine, ctx, run_dir)
        trainer = Trainer(
            train=config.train, data=config.data, seq_len=config.model.seq_len, ctx=ctx, engine=engine,
            batches=batches,
            callbacks=[*build_callbacks(config.logging, rank=ctx.rank, run_dir=run_dir,
                                        max_steps=config.train.max_steps, run_config=config.to_dict()),
                       *build_guard(config, ctx.rank, run_dir),
                       *([ScheduledGarbageCollection(config.train.gc_every)] if config.train.gc_every else []),
                       *([RoutingMetrics(config.model.moe, config.model.num_layers)] if config.model.moe.enabled else []),
                       *([HangWatchdog(config.watchdog, rank=ctx.rank, run_dir=run_dir,
                                       device_type=ctx.device.type)] if config.watchdog.timeout_s else [])],
            checkpoint_every=config.checkpoint.every, checkpointer=checkpointer, preemption=preemption,
            val_batches=build_val_batches(config.data, config.train, ctx),
            flops_per_token=flops_per_token(config.model, vocab_size), peak_flops=peak,
        )
        if resume_from is not None:
            checkpointer.load(resume_from, engine, trainer.checkpoint_parts())
        history = trainer.train()
        if ctx.rank == 0 and history:
            log.info(f"done: {trainer.state.step} steps, final loss {history[-1]['loss']:.4f}; "
                     f"run directory {run_dir.resolve()}")
    finally:
        if trainer is not None:
            trainer.close()
        if batches is not None:
            batches.close()
        checkpointer.close()
        if engine is not None:
            engine.close()
        if preemption is not None:
            preemption.close()
        destroy_parallel()
    return history
