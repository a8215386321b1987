"""``kiln ckpt import --hf DIR OUT [CONFIG] [key=value …] [--nproc-per-node N]``: an HF Llama (or
Mixtral) model as a kiln checkpoint of any layout, to continue pre-training with
``kiln train CONFIG --resume-from OUT``.

The import runs the real stack, so every engine and layout gets a checkpoint it wrote itself:
``--nproc-per-node N`` starts N workers exactly as ``kiln train`` does (:func:`kiln.cli.launch_torchrun`);
each builds its model parts with the run's builder, fills its own slice of every parameter from
the memory-mapped HF safetensors (:func:`kiln.hf.weights.fill_model_parts`) *before* the engine
wraps them (so master weights, ZeRO/FSDP shards and optimizer start from the HF weights), and
the normal :class:`~kiln.checkpoint.manager.CheckpointManager` saves step 0 into ``OUT.tmp-<pid>``,
renamed to OUT when every worker is done.

The checkpoint carries no data-loader position and zero counters (kiln.json: ``imported``; its
only part is the trainer's counters at 0): a run resumed from it starts at step 0 and sample 0 of
its own data, whatever data the import never saw.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
from operator import attrgetter
from pathlib import Path
from typing import Any

from kiln.checkpoint import tools
from kiln.config import RunConfig, config_from_dict, read_yaml_mapping
from kiln.errors import KilnCheckpointError, KilnConfigError
from kiln.hf import families, llama

log = logging.getLogger("kiln")
HF_CONFIG = "config.json"
# Model settings the HF model fixes besides its shape; seq_len is the run's own choice (a CONFIG's wins).
_MEANING_KEYS = ("rope_theta", "norm_eps", "moe.top_k")


def read_hf_model(hf_dir: Path) -> dict[str, Any]:
    """kiln ``model:`` settings of the HF model in ``hf_dir`` (refusing what kiln cannot hold)."""
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise KilnConfigError(f"{hf_dir} has no {HF_CONFIG}; pass a Hugging Face model directory "
                              f"(what save_pretrained writes)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KilnConfigError(f"{path} is not valid JSON ({err})") from None
    return families.of_hf_config(config).model_section_from_hf(config, str(path))


def read_hf_precision(hf_dir: Path) -> str:
    """kiln's train.precision for the HF weights' dtype (bf16 when config.json does not say)."""
    config = json.loads((hf_dir / HF_CONFIG).read_text())
    dtype = config.get("torch_dtype") or config.get("dtype")
    return {"float32": "fp32", "float16": "fp16"}.get(dtype, "bf16")


def import_config(hf_dir: Path, config_path: str | None, overrides: list[str]) -> RunConfig:
    """The run config the checkpoint is made for: CONFIG (or kiln's defaults) and the overrides, with
    the HF model's settings; a CONFIG describing another model is an error naming each difference."""
    from kiln.checkpoint.state import architecture_differences
    from kiln.config import model_config_from_saved
    from kiln.plan.dry_run import resolve_vocab_size

    hf_model = read_hf_model(hf_dir)
    if config_path is None:  # the HF model's settings and precision, kiln's defaults for the rest
        raw = {"name": hf_dir.resolve().name, "model": dict(hf_model), "train": {"precision": read_hf_precision(hf_dir)}}
        where, fix = "the model overrides", "leave those overrides out"
    else:
        raw = read_yaml_mapping(config_path, hint=" (shipped configs are in configs/)")
        raw.setdefault("name", Path(config_path).stem)
        where, fix = config_path, "leave out CONFIG to take them all from it"
    asked = config_from_dict(raw, overrides)
    diffs = architecture_differences(hf_model, asked.model, "HF model")
    hf_as_kiln = model_config_from_saved(hf_model)
    diffs += [f"model.{key}: HF model {attrgetter(key)(hf_as_kiln)!r}, config {attrgetter(key)(asked.model)!r}"
              for key in _MEANING_KEYS if attrgetter(key)(asked.model) != attrgetter(key)(hf_as_kiln)]
    vocab = resolve_vocab_size(asked.model, asked.data)
    if vocab != hf_model["vocab_size"]:
        diffs.append(f"vocabulary: HF model {hf_model['vocab_size']}, config {vocab} (model.vocab_size, or "
                     f"data.tokenizer's size when unset; train with the HF model's tokenizer.json)")
    if diffs:
        raise KilnConfigError(f"the run config ({where}) describes another model than {hf_dir / HF_CONFIG} "
                              f"({'; '.join(diffs)}); set those values to the HF model's, or {fix}")
    families.of_model(asked.model).shape_of(asked.model, vocab)  # routing the HF architecture has no form for
    return asked


def worker_overrides(staging: Path) -> list[str]:
    """What every import worker runs with: no W&B, no background save, everything under ``staging``."""
    return [f"checkpoint.dir={staging}", f"train.run_dir={staging}", "checkpoint.async=false",
            "logging.wandb=disabled"]


def import_on_this_rank(config: RunConfig, hf_dir: Path) -> None:
    """One rank of the import: build, fill from HF, wrap in the engine, save step 0 (collective)."""
    from kiln.checkpoint.manager import CheckpointManager
    from kiln.hf.weights import HFWeights, fill_model_parts
    from kiln.log import setup_logging
    from kiln.parallel.backend import destroy_parallel, init_parallel, worker_environment
    from kiln.plan.dry_run import resolve_vocab_size
    from kiln.plan.params import padded_vocab_size
    from kiln.train import build_run_engine, build_run_model, check_environment
    from kiln.trainer.loop import TrainState

    vocab = resolve_vocab_size(config.model, config.data)  # equal to the HF model's (import_config)
    family = families.of_model(config.model)
    shape = family.shape_of(config.model, vocab)
    weights = HFWeights(hf_dir)
    llama.check_hf_names(weights.names(), shape, str(hf_dir))  # before any process group: a plain error
    os.environ.update(worker_environment(config.parallel, config.train.device, config.train.run_dir))
    check_environment(config)
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    setup_logging(ctx.rank)
    padded = padded_vocab_size(vocab, config.model, ctx.layout.tp)
    with contextlib.ExitStack() as cleanup:  # closed in reverse: checkpointer, engine, process groups
        cleanup.callback(destroy_parallel)
        parts = build_run_model(config, ctx, vocab)
        fill_model_parts(parts, weights, shape, padded)
        engine = build_run_engine(config, ctx, vocab, model_parts=parts)
        cleanup.callback(engine.close)
        checkpointer = CheckpointManager(config.checkpoint, ctx, Path(config.train.run_dir), config.model,
                                         config.to_dict())
        cleanup.callback(checkpointer.close)
        checkpointer.prepare()
        origin = {"imported": {"from": str(hf_dir.resolve()), "format": family.FORMAT}}
        checkpointer.save(0, engine, {"trainer": TrainState()}, blocking=True, extra_meta=origin)
        if ctx.rank == 0:
            log.info(f"imported {hf_dir} as a {engine.describe(engine.parallel_config)} checkpoint, layout "
                     f"tp={ctx.layout.tp} pp={ctx.layout.pp} dp={ctx.layout.dp} ep={ctx.layout.ep}")


def cmd_import(args: argparse.Namespace) -> int:
    from kiln.cli import inside_torchrun, launch_torchrun

    hf_dir, out = Path(args.hf), Path(args.out)
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        config_path, overrides = None, [config_path, *overrides]  # `import --hf DIR OUT parallel.tp=2`
    if inside_torchrun():  # a worker: the launcher chose the staging directory (checkpoint.dir)
        import_on_this_rank(import_config(hf_dir, config_path, overrides), hf_dir)
        return 0
    tools.check_output_dir(out, args.overwrite)
    staging = tools.staging_dir(out)
    try:
        forced = [*overrides, *worker_overrides(staging)]
        config = import_config(hf_dir, config_path, forced)  # a mismatch stops here, before any process starts
        config.layout(args.nproc_per_node or 1)  # a layout this many processes cannot make, too
        if args.nproc_per_node:
            from kiln.train import check_environment

            check_environment(config)
            worker = ["ckpt", "import", "--hf", str(hf_dir), str(out), *([config_path] if config_path else []), *forced]
            code = launch_torchrun(args, config, worker_args=worker)
            if code != 0:
                raise KilnCheckpointError(f"the import workers failed (exit {code}, see above); nothing was written "
                                          f"to {out}")
        else:
            import_on_this_rank(config, hf_dir)
        tools.publish_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}: {hf_dir} as a kiln checkpoint at step 0 (tp={config.parallel.tp} pp={config.parallel.pp}, "
          f"engine {config.parallel.engine}, {config.train.precision}); continue pre-training with "
          f"`kiln train {config_path or 'CONFIG'} --resume-from {out}`"
          + ("" if config_path else f", CONFIG with the HF model's settings and train.precision={config.train.precision}"))
    return 0
