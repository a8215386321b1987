"""HF safetensors weights on disk: read them memory-mapped, fill kiln model parts, write shards.

Reading: ``model.safetensors``, or the shards a ``model.safetensors.index.json`` names, opened
with ``safetensors.safe_open`` (memory-mapped: a tensor is read when asked for, one at a time).

Filling (the import): every rank fills only its own shard of each parameter of its model parts.
megatron-core's ``sharded_state_dict()`` says which slice of which global tensor a rank holds
(``ShardedTensor.global_slice()``, the same description a checkpoint load uses, SwiGLU's
two-piece fc1 included); the rank builds the full global tensor of one layer from the HF
tensors (kiln.hf.llama), slices its part and loads it, as ``dist_checkpointing.load`` would.
An MoE layer's experts are one such entry each, the expert's global index its second axis
(after the layer's): under expert parallelism a rank reads only the experts it holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnConfigError
from kiln.hf import llama

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class HFWeights:
    """The tensors of an HF model directory, by name, memory-mapped."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = directory
        if (directory / INDEX_FILE).is_file():
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            files, weight_map = [SINGLE_FILE], None
        else:
            raise KilnConfigError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}; kiln imports HF "
                                  f"safetensors weights (save the model with save_pretrained(safe_serialization=True))")
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise KilnConfigError(f"{directory / INDEX_FILE} names weight files that are not there: {', '.join(missing)}")
        self._files = {name: safe_open(str(directory / name), framework="pt") for name in files}
        if weight_map is None:
            weight_map = {key: SINGLE_FILE for key in self._files[SINGLE_FILE].keys()}
        self.weight_map: dict[str, str] = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KilnConfigError(f"{self.directory} has no tensor {name}; is it a Llama or Mixtral model?")
        return self._files[self.weight_map[name]].get_tensor(name)


def fill_model_parts(model_parts: list[torch.nn.Module], weights: HFWeights, shape: llama.LlamaShape,
                     padded_vocab: int) -> None:
    """Overwrite every parameter of this rank's model parts with its slice of the HF weights."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values
    from megatron.core.dist_checkpointing.mapping import (ShardedTensor, ShardedTensorFactory, apply_factories,
                                                          apply_factory_merges)

    last: dict[str, Any] = {}  # the newest full tensor: SwiGLU's two pieces and TP ranks' parts share it

    def full_tensor(name: str, index: tuple[int, ...]) -> torch.Tensor:
        if last.get("key") != (name, index):
            last.update(key=(name, index),
                        value=llama.kiln_tensor_from_hf(name, index, weights.read, shape, padded_vocab))
        return last["value"]

    def fill(entry) -> torch.Tensor | None:
        """This rank's slice of one ShardedTensor, as a checkpoint load would give it."""
        if not isinstance(entry, ShardedTensor):
            return None  # Transformer Engine's _extra_state objects: nothing of the HF model
        if entry.flattened_range is not None:
            raise AssertionError("a model's sharded state dict has no flattened (optimizer) ranges")
        where = entry.global_slice()
        # The axes megatron-core prepends to a layer weight: the layer's, then for an expert its global index.
        stacked = entry.prepend_axis_num if entry.key.startswith(llama.LAYERS) else 0
        local = full_tensor(entry.key, tuple(where[:stacked]))[where[stacked:]]
        if tuple(local.shape) != tuple(entry.local_shape):
            raise KilnConfigError(f"{entry.key}: the HF model gives shape {tuple(local.shape)} where kiln's model "
                                  f"has {tuple(entry.local_shape)}; the model settings do not match config.json")
        return local.to(entry.data.dtype).clone()

    for part in model_parts:
        sharded = part.sharded_state_dict()
        built = dict(sharded)
        apply_factories(built)  # SwiGLU fc1 under TP: its gate and up pieces, each a ShardedTensor
        dict_list_map_inplace(fill, built)
        factories, _ = extract_matching_values(sharded, lambda value: isinstance(value, ShardedTensorFactory))
        merged = apply_factory_merges(built, factories)  # SwiGLU's pieces concatenated back
        state = {key: value for key, value in merged.items() if isinstance(value, torch.Tensor)}
        missing, _ = part.load_state_dict(state, strict=False)
        unfilled = [key for key in missing if not key.endswith("_extra_state")]
        if unfilled:
            raise AssertionError(f"parameters left unfilled by the HF import: {unfilled}")


# -- writing -----------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """``5GB`` (10^9, as HF counts), ``500MiB`` (2^20), ``1000`` (bytes) → bytes."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise KilnConfigError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> list[str]:
    """``model.safetensors``, or numbered shards and their index when above ``max_bytes``; the file names."""
    from safetensors.torch import save_file

    shards = plan_shards(tensors, max_bytes)
    if len(shards) == 1:
        save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    weight_map = {}
    files = []
    for index, names in enumerate(shards, start=1):
        file = SHARD_FILE.format(index=index, count=len(shards))
        save_file({name: tensors[name] for name in names}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
    return [*files, INDEX_FILE]
