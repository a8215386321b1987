"""What a checkpoint holds, composed from the parts that own it.

Two halves:

* The **sharded state** (torch DCP files, through megatron-core ``dist_checkpointing``): the
  engine's model and optimizer (:meth:`Engine.sharded_state_dict`, global keys and offsets, so
  any TP/PP/DP layout loads them) and the RNG states, one ShardedObject per (pp, tp, cp) position.
* The **kiln metadata** (``kiln.json``, plain JSON so ``kiln ckpt inspect`` needs no unpickling):
  the ``state_dict()`` of every other part (the trainer's counters, the data loader's position,
  stateful callbacks such as the W&B run id), the engine's small state (the LR schedule's
  position), the layout it was saved with, the resolved config and versions.

Every part owns its state: this module asks each for ``state_dict()`` and hands each its
``load_state_dict()``; it never reaches into another object's attributes.
"""

from __future__ import annotations

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
_RESOLVED = {"num_query_groups": "query_groups", "ffn_hidden_size": "ffn_size"}  # None: a derived value
# Mixture-of-experts settings that change which tensors exist or their shapes.
_MOE_ARCHITECTURE_KEYS = ("num_experts", "shared_experts", "layer_freq")


class RNGState:
    """Every generator a rank draws from (python, numpy, torch, the model-parallel tracker, CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "tracker": get_cuda_rng_tracker().get_states(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        get_cuda_rng_tracker().set_states(state["tracker"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])


def rng_sharded_object(rng: RNGState, layout, coords: dict[str, int], *, is_loading: bool):
    """This rank's RNG state as a ShardedObject at its (pp, tp, cp) position; DP ranks share theirs."""
    from megatron.core.dist_checkpointing import ShardedObject

    return ShardedObject("kiln.rng_state", {} if is_loading else rng.state_dict(), (layout.pp, layout.tp, layout.cp),
                         (coords["pp"], coords["tp"], coords["cp"]), replica_id=coords["dp"])


def kiln_metadata(engine, parts: dict[str, Any], layout, run_config: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """kiln.json: every part's ``state_dict()``, the engine's small state, layout, config, versions
    (and ``extra``, e.g. where imported weights came from)."""
    part_states = {name: part.state_dict() for name, part in parts.items()}
    return {**(extra or {}),
        "step": part_states["trainer"]["step"],
        "engine": {"name": engine.name, "checkpoint_format": engine.checkpoint_format,
                   "description": engine.describe(engine.parallel_config), "state": engine.state_dict()},
        "parts": part_states,
        "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp,
                   "virtual_pp": layout.virtual_pp, "world_size": layout.world_size},
        "config": run_config,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"kiln": _version("kiln"), "torch": torch.__version__, "megatron-core": _version("megatron-core")},
    }


def load_parts(parts: dict[str, Any], meta: dict[str, Any]) -> None:
    """Hand every part its saved state; parts the checkpoint does not have keep theirs."""
    for name, part in parts.items():
        if name in meta["parts"]:
            part.load_state_dict(meta["parts"][name])


def write_metadata(directory: Path, meta: dict[str, Any]) -> None:
    (directory / KILN_META).write_text(json.dumps(meta, indent=1, default=str) + "\n")


def read_metadata(directory: Path) -> dict[str, Any]:
    """kiln.json, in the current layout (checkpoints of kiln before the engine interface included)."""
    try:
        meta = json.loads((directory / KILN_META).read_text())
    except FileNotFoundError:
        raise KilnCheckpointError(f"{directory} has no {KILN_META}: not a kiln checkpoint") from None
    return meta if "parts" in meta else _from_flat_layout(meta)


def _from_flat_layout(meta: dict[str, Any]) -> dict[str, Any]:
    """Older kiln.json kept counters, loader and scheduler at the top level."""
    from kiln.engine import engine_class

    name = meta["config"]["parallel"].get("engine", "megatron")
    parts: dict[str, Any] = {
        "trainer": {k: meta[k] for k in ("step", "consumed_samples", "consumed_tokens")},
        "loader": meta["loader"],
    }
    if meta.get("wandb_run_id"):
        parts["callback.WandbLogger"] = {"run_id": meta["wandb_run_id"]}
    engine = {"name": name, "checkpoint_format": engine_class(name).checkpoint_format, "description": name,
              "state": {"scheduler": meta["scheduler"]}}
    return {**meta, "engine": engine, "parts": parts}


def same_rng_layout(meta: dict[str, Any], layout) -> bool:
    saved = meta["layout"]
    return (saved["pp"], saved["tp"], saved["cp"]) == (layout.pp, layout.tp, layout.cp)


def check_architecture(meta: dict[str, Any], model_config, where: Path) -> None:
    """The checkpoint's model must have the run's shapes; name every difference and the fix."""
    diffs = architecture_differences(meta["config"]["model"], model_config, "checkpoint")
    if diffs:
        raise KilnCheckpointError(
            f"checkpoint {where} was saved from a different model ({'; '.join(diffs)}); "
            f"set those values to the checkpoint's, or start without it (--no-resume and a new train.run_dir)")


def architecture_differences(saved_model: dict[str, Any], model_config, source: str) -> list[str]:
    """``model.<key>: <source> A, config B`` for each shape setting that differs, compared as resolved
    (an unset num_query_groups or ffn_hidden_size means its derived value, not a different model)."""
    from kiln.config import model_config_from_saved

    saved = _architecture(model_config_from_saved(saved_model))
    current = _architecture(model_config)
    return [f"model.{k}: {source} {saved.get(k)!r}, config {v!r}" for k, v in current.items() if saved.get(k) != v]


def _architecture(model) -> dict[str, Any]:
    shape = {key: getattr(model, _RESOLVED.get(key, key)) for key in _ARCHITECTURE_KEYS}
    if len(model.moe.moe_layers(model.num_layers)) == model.num_layers:
        del shape["ffn_hidden_size"]  # no layer has the dense MLP (an HF Mixtral has no such width)
    shape.update({f"moe.{key}": getattr(model.moe, key) for key in _MOE_ARCHITECTURE_KEYS})
    if model.moe.enabled:
        shape["moe.expert_ffn_hidden_size"] = model.expert_ffn_size
    return shape


def tensor_keys(directory: Path) -> frozenset[str]:
    """Names of the tensors a checkpoint holds, from its DCP index (no tensor data is read)."""
    from torch.distributed.checkpoint import FileSystemReader

    return frozenset(FileSystemReader(str(directory)).read_metadata().state_dict_metadata)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
