"""``kiln ckpt export PATH --hf OUT``: a kiln checkpoint as a Hugging Face ``LlamaForCausalLM`` directory,
or ``MixtralForCausalLM`` for a mixture-of-experts model (kiln.hf.families picks from model.moe).

Runs in one plain process, like ``kiln ckpt convert``: the full tensors come from
:func:`kiln.checkpoint.tools.load_verified_tensors` (manifest verified, shards assembled by torch
DCP), so any TP/PP/DP layout and any engine exports. OUT gets ``config.json``,
``generation_config.json``, the weights (``model.safetensors``, or shards and their index above
``--max-shard-size``) and the run's tokenizer (``tokenizer.json`` and a ``tokenizer_config.json``
that ``AutoTokenizer`` reads). Written into ``OUT.tmp-<pid>`` and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.checkpoint import tools
from kiln.config import ModelConfig, model_config_from_saved
from kiln.errors import KilnCheckpointError
from kiln.hf import families, llama
from kiln.hf.weights import parse_size, save_safetensors

DTYPES = ("fp32", "bf16", "fp16")
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_MAX_SHARD_SIZE = "5GB"  # as transformers' save_pretrained


@dataclass(frozen=True)
class Exported:
    out: Path
    step_dir: Path
    dtype: str
    parameters: int
    files: list[str]
    architecture: str


def saved_model_config(meta: dict[str, Any], step_dir: Path) -> ModelConfig:
    """The run's ``model:`` section from kiln.json (settings of other kiln versions ignored)."""
    saved = meta.get("config", {}).get("model")
    if not saved:
        raise KilnCheckpointError(f"{step_dir} has no readable kiln.json with the run's model settings; export needs "
                                  f"them for config.json; {tools.other_steps_hint(step_dir)}")
    return model_config_from_saved(saved)


def export_dtype(meta: dict[str, Any], requested: str | None) -> str:
    """--dtype, else the run's precision where HF has it (fp8 runs keep bf16 weights)."""
    if requested:
        return requested
    precision = meta.get("config", {}).get("train", {}).get("precision")
    return precision if precision in DTYPES else "bf16"


def exported_weights(step_dir: Path, checksums: bool) -> dict[str, Any]:
    """The model's full tensors; where the checkpoint keeps fp32 master weights (bf16 or fp16 training),
    those instead: the working weights are their rounded copies, so ``--dtype fp32`` keeps every bit.
    An MoE run's masters are split over megatron-core's chained optimizers (``chained_<i>.``)."""
    from kiln.engine.portable_state import PREFIX, master_name_in

    master = master_name_in(tools.unchained(t.name) for t in tools.list_entries(tools.read_dcp_index(step_dir))[0])
    prefix = f"{PREFIX}.{master}." if master else None

    def wanted(entry: tools.TensorEntry) -> bool:
        return entry.kind == "model" or (prefix is not None and tools.unchained(entry.name).startswith(prefix))

    loaded = {tools.unchained(name): tensor
              for name, tensor in tools.load_verified_tensors(step_dir, wanted, checksums, "export").items()}
    model = {name: tensor for name, tensor in loaded.items() if not tools.is_optimizer_tensor(name)}
    return {name: loaded.get(f"{prefix}{name}", tensor) if prefix else tensor for name, tensor in model.items()}


def export_checkpoint(path: Path, out: Path, *, dtype: str | None = None,
                      max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, checksums: bool = True,
                      overwrite: bool = False, tokenizer_file: str | None = None) -> Exported:
    import torch

    from kiln.data.tokenizer import EOS_TOKEN, bundled_tokenizer_path, load_tokenizer

    max_bytes = parse_size(max_shard_size)
    tools.require_safetensors()
    tools.check_output_dir(out, overwrite)
    step_dir = tools.resolve_step_dir(path)
    meta = tools.read_kiln_meta(step_dir)
    model = saved_model_config(meta, step_dir)
    tokenizer_path = tokenizer_file or meta["config"].get("data", {}).get("tokenizer") or bundled_tokenizer_path()
    tokenizer = load_tokenizer(tokenizer_path)  # a missing file stops here, before the tensors load
    family = families.of_model(model)
    shape = family.shape_of(model, model.vocab_size or tokenizer.vocab_size)  # refusals before the tensors load
    dtype = export_dtype(meta, dtype)
    tensors = exported_weights(step_dir, checksums)
    torch_dtype = getattr(torch, TORCH_DTYPE_NAMES[dtype])
    weights = {name: t.to(torch_dtype) for name, t in llama.kiln_to_hf(tensors, shape).items()}
    config = family.hf_config(model, shape, TORCH_DTYPE_NAMES[dtype], eos_id=tokenizer.eos_id, bos_id=tokenizer.eos_id)

    tmp = tools.staging_dir(out)
    try:
        files = save_safetensors(weights, tmp, max_bytes)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id,
                                                     "pad_token_id": tokenizer.pad_id})
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        # kiln's tokenizers have one special token: <|endoftext|> ends (and so begins) documents, and pads.
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
            "pad_token": EOS_TOKEN, "model_max_length": model.seq_len, "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"]})  # Llama and Mixtral take no token_type_ids
        tools.publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = [*files, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    return Exported(out, step_dir, dtype, sum(t.numel() for t in weights.values()), files, family.ARCHITECTURE)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
