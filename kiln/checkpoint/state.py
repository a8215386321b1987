"""What a checkpoint holds, and how it maps onto the live trainer.

Two parts:

* The **sharded state** (torch DCP files, through megatron-core ``dist_checkpointing``): model
  chunks and optimizer as ShardedTensors keyed by *global* parameter names and offsets, so any
  TP/PP/DP layout can load them; RNG states as one ShardedObject per (pp, tp, cp) position.
* The **kiln metadata** (``kiln.json``, plain JSON so ``kiln ckpt inspect`` needs no unpickling):
  step and counters, data-loader position, LR-scheduler counters, the layout it was saved
  with, the resolved config and the W&B run id.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.errors import KilnCheckpointError

KILN_META = "kiln.json"
# Model settings that change tensor shapes or meaning; a checkpoint only loads if they agree.
_ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                      "tie_embeddings")
# megatron-core's distributed optimizer format that reshards over TP, PP and DP (its
# "fully_sharded_model_space" is not supported by the torch_dist backend in 0.16; this one
# gathers the state over the DP group to save it, which costs memory on DP rank 0).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def model_sharded_state(models: list[torch.nn.Module]) -> dict[str, Any]:
    """Per-chunk sharded state dicts (keys inside are global, so chunking does not matter)."""
    return {f"model{i}": model.module.sharded_state_dict() for i, model in enumerate(models)}


def rng_position(layout, coords: dict[str, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global shape, offset) of this rank's RNG state; data-parallel ranks share theirs."""
    return (layout.pp, layout.tp, layout.cp), (coords["pp"], coords["tp"], coords["cp"])


def capture_rng(device: torch.device) -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def ensure_adam_state(optimizer) -> None:
    """Give every parameter an (all-zero) Adam state before a load fills it in place.

    megatron-core's distributed optimizer reads the state's ``step`` while building the sharded
    state dict to load into, and a fresh torch Adam has no state until its first step.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = inner.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                         "exp_avg_sq": torch.zeros_like(param)}


@contextlib.contextmanager
def torch_adam_load_fixes(optimizer):
    """Work around megatron-core 0.16 loading torch Adam state into the distributed optimizer.

    Without TE/Apex the inner optimizer is torch's Adam, whose per-parameter state holds a
    ``step``. Two bugs on that path:

    * the fully-reshardable loader copies every state key from the checkpoint's tensors,
      which never include ``step`` (saved once, restored before), and fails with KeyError;
      handing it the current ``step`` makes that copy a no-op;
    * the restored ``step`` is one tensor object shared by every parameter, so each optimizer
      step would advance it once per parameter; each parameter gets its own copy after.
    """
    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def with_step(model_param, tensors, inner=inner, setter=setter):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
            step = inner.optimizer.state[main_param].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            return setter(model_param, tensors)

        inner._set_main_param_and_optimizer_states = with_step
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # back to the class method
            for state in inner.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def sharded_state(trainer, *, is_loading: bool, with_rng: bool = True) -> dict[str, Any]:
    """The megatron-core sharded state dict of the trainer (model, optimizer, RNG)."""
    from megatron.core.dist_checkpointing import ShardedObject

    if trainer.deepspeed is not None:
        from kiln.checkpoint import deepspeed_state

        state = deepspeed_state.sharded_state(trainer.deepspeed, is_loading=is_loading)
    else:
        if is_loading:
            ensure_adam_state(trainer.optimizer)
        state = model_sharded_state(trainer.models)
        # The optimizer maps its params to the model's ShardedTensors through all chunks (nested,
        # not merged: interleaved chunks share local key names).
        state["optimizer"] = trainer.optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                                  metadata=OPTIMIZER_METADATA)
    if with_rng:
        shape, offset = rng_position(trainer.ctx.layout, trainer.ctx.coords)
        state["rng"] = ShardedObject("kiln.rng_state", capture_rng(trainer.ctx.device), shape, offset,
                                     replica_id=trainer.ctx.coords["dp"])
    return state


def load_model_and_optimizer(trainer, loaded: dict[str, Any]) -> None:
    """Put the model and optimizer parts of a loaded ``sharded_state`` into the live engine."""
    if trainer.deepspeed is not None:
        from kiln.checkpoint import deepspeed_state

        deepspeed_state.load(trainer.deepspeed, loaded)
        return
    for index, model in enumerate(trainer.models):
        model.module.load_state_dict(loaded[f"model{index}"])
    with torch_adam_load_fixes(trainer.optimizer):
        trainer.optimizer.load_state_dict(loaded["optimizer"])


def kiln_metadata(trainer, wandb_run_id: str | None) -> dict[str, Any]:
    layout = trainer.ctx.layout
    return {
        "step": trainer.step,
        "consumed_samples": trainer.consumed_samples,
        "consumed_tokens": trainer.consumed_tokens,
        "loader": trainer.batches.state_dict(),
        "scheduler": {"num_steps": trainer.scheduler.num_steps},
        "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp,
                   "virtual_pp": layout.virtual_pp, "world_size": layout.world_size},
        "wandb_run_id": wandb_run_id,
        "config": trainer.config.to_dict(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"kiln": _version("kiln"), "torch": torch.__version__, "megatron-core": _version("megatron-core")},
    }


def write_metadata(directory: Path, meta: dict[str, Any]) -> None:
    (directory / KILN_META).write_text(json.dumps(meta, indent=1, default=str) + "\n")


def read_metadata(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / KILN_META).read_text())
    except FileNotFoundError:
        raise KilnCheckpointError(f"{directory} has no {KILN_META}: not a kiln checkpoint") from None


def same_rng_layout(meta: dict[str, Any], layout) -> bool:
    saved = meta["layout"]
    return (saved["pp"], saved["tp"], saved["cp"]) == (layout.pp, layout.tp, layout.cp)


def check_architecture(meta: dict[str, Any], config, where: Path) -> None:
    """The checkpoint's model must have the run's shapes and optimizer format; name every
    difference and the fix."""
    saved_engine = meta["config"]["parallel"].get("engine", "megatron")
    if saved_engine != config.parallel.engine:
        raise KilnCheckpointError(
            f"checkpoint {where} was saved by the {saved_engine} engine and this run uses "
            f"parallel.engine={config.parallel.engine}; their optimizer states differ: set "
            f"parallel.engine={saved_engine} to resume it")
    model_config = config.model
    saved = meta["config"]["model"]
    current = {k: getattr(model_config, k) for k in _ARCHITECTURE_KEYS}
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise KilnCheckpointError(
            f"checkpoint {where} was saved from a different model ({'; '.join(diffs)}); "
            f"set those values to the checkpoint's, or start without it (--no-resume and a new train.run_dir)")


def apply_metadata(trainer, meta: dict[str, Any]) -> None:
    """Counters, LR-scheduler position and data position from a checkpoint's kiln.json."""
    trainer.step = int(meta["step"])
    trainer.consumed_samples = int(meta["consumed_samples"])
    trainer.consumed_tokens = int(meta["consumed_tokens"])
    # The schedule's shape comes from the run's config (so max_steps can be extended on resume);
    # only its position comes from the checkpoint. step(0) re-applies LR and weight decay.
    trainer.scheduler.num_steps = int(meta["scheduler"]["num_steps"])
    trainer.scheduler.step(increment=0)
    trainer.batches.load_state_dict(meta["loader"])


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
