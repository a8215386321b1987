"""Open a checkpoint for inference and put its model weights into this rank's model chunks.

Shared by ``kiln generate`` and ``kiln eval``. The run config comes from the checkpoint's
``kiln.json`` (the training run's resolved config), with :data:`INFERENCE_DEFAULTS` and then
the command line's overrides on top. Only the model tensors are read: each chunk's megatron-core
sharded state dict is the request, under the names every engine saves (megatron, deepspeed and
fsdp write the same model keys), so no optimizer state is read or held, and torch DCP reshards
whatever TP/PP/DP layout wrote the checkpoint into the layout asked for.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import RunConfig, config_from_dict
from kiln.errors import KilnCheckpointError

# Where an inference command starts, whatever layout the training run had: one process on one
# device (CUDA when present). Overrides on the command line (parallel.tp=2, train.device=cpu)
# apply after these. Compilation would recompile for every new window length; a run directory,
# W&B or sequence parallelism (which needs tp > 1 and a sequence divisible by it) have no use here.
INFERENCE_DEFAULTS = (
    "parallel.tp=1", "parallel.pp=1", "parallel.cp=1", "parallel.dp=null", "parallel.virtual_pp=null",
    "parallel.ep=1", "parallel.expert_tp=null", "parallel.sequence_parallel=false", "parallel.tp_comm_overlap=false",
    "train.device=auto", "train.run_dir=null", "kernels.compile=false", "logging.wandb=disabled",
)


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A verified checkpoint step directory, its kiln.json, and the run config inference uses."""

    step_dir: Path
    meta: dict[str, Any]
    config: RunConfig

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def open_checkpoint(path: str, overrides: list[str]) -> OpenedCheckpoint:
    """Resolve PATH (step, checkpoint or run directory), check it is whole, and build its config.

    Runs on one process before anything starts (sizes only, no CRC32s: a big checkpoint opens
    at once; the DCP read fails on a file that does not match its index anyway).
    """
    from kiln.checkpoint import store
    from kiln.checkpoint.state import check_architecture, read_metadata
    from kiln.checkpoint.tools import other_steps_hint, resolve_step_dir
    from kiln.parallel.megatron_compat import check_can_read_checkpoint

    step_dir = resolve_step_dir(Path(path))
    verdict = store.verify_checkpoint(step_dir, checksums=False)
    if not verdict.ok:
        raise KilnCheckpointError(f"checkpoint {step_dir} is not usable ({verdict.reason}); {other_steps_hint(step_dir)}")
    meta = read_metadata(step_dir)
    config = config_from_dict(meta["config"], [*INFERENCE_DEFAULTS, *overrides])
    check_architecture(meta, config.model, step_dir)
    check_can_read_checkpoint(meta.get("versions", {}).get("megatron-core", "unknown"), step_dir)
    return OpenedCheckpoint(step_dir=step_dir, meta=meta, config=config)


def start_rank(config: RunConfig):
    """Join the world (a world of one outside torchrun) with the config's layout; log to stderr,
    so stdout carries only the command's result. Returns the parallel context."""
    from kiln.log import setup_logging
    from kiln.parallel.backend import init_parallel, worker_environment
    from kiln.train import check_environment

    os.environ.update(worker_environment(config.parallel, config.train.device))
    check_environment(config)
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    setup_logging(ctx.rank, console_stream=sys.stderr)
    return ctx


def load_model(opened: OpenedCheckpoint, ctx) -> tuple[list, int]:
    """This rank's model chunks (kiln's builder, the config's layout) holding the checkpoint's
    weights, in eval mode; and the vocabulary size (before padding). Collective."""
    from kiln.plan.dry_run import resolve_vocab_size
    from kiln.train import build_run_model

    config = opened.config
    vocab_size = resolve_vocab_size(config.model, config.data)
    parts = build_run_model(config, ctx, vocab_size)
    load_model_weights(parts, opened.step_dir)
    for part in parts:
        part.eval()
    return parts, vocab_size


def load_model_weights(parts: list, step_dir: Path) -> None:
    """Read the model tensors of ``step_dir`` into ``parts`` (collective: DCP reads over all ranks).

    Transformer Engine modules' ``_extra_state`` (FP8 scaling history) that the checkpoint does
    not hold (one written without TE) is not asked for; those modules keep their fresh state.
    """
    from megatron.core import dist_checkpointing

    from kiln.checkpoint.state import tensor_keys
    from kiln.checkpoint.tools import other_steps_hint
    from kiln.engine.megatron import drop_unsaved_extra_state
    from kiln.kernels.fp8 import trusted_te_extra_state

    request = {f"model{index}": part.sharded_state_dict() for index, part in enumerate(parts)}
    saved = tensor_keys(step_dir)
    kept = [drop_unsaved_extra_state(request[f"model{index}"], saved) for index in range(len(parts))]
    try:
        with trusted_te_extra_state():  # TE's delayed-scaling FP8 state is a pickle (kiln.kernels.fp8)
            loaded = dist_checkpointing.load(request, str(step_dir))
    except Exception as err:  # megatron-core and DCP raise many kinds; say which checkpoint and why
        raise KilnCheckpointError(f"reading the model weights of {step_dir} failed ({type(err).__name__}: {err}); "
                                  f"{other_steps_hint(step_dir)}") from err
    for index, part in enumerate(parts):
        own = part.state_dict()
        weights = loaded[f"model{index}"]
        weights.update({name: own[name] for name in kept[index]})
        part.load_state_dict(weights)
