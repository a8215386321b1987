"""``kiln ckpt export … --hf`` and ``kiln ckpt import --hf …``: registered by kiln.checkpoint.tools."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from kiln.checkpoint.tools import _human_bytes
    from kiln.hf.export import export_checkpoint

    done = export_checkpoint(Path(args.path), Path(args.hf), dtype=args.dtype, max_shard_size=args.max_shard_size,
                             checksums=not args.no_checksums, overwrite=args.overwrite, tokenizer_file=args.tokenizer)
    size = sum((done.out / name).stat().st_size for name in done.files)
    print(f"wrote {done.out}: Hugging Face {done.architecture}, {done.parameters:,} parameters in {done.dtype}, "
          f"{len(done.files)} files ({_human_bytes(size)}) from {done.step_dir}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from kiln.hf.importer import cmd_import as run_import

    return run_import(args)


def add_hf_commands(csub, where: str) -> None:
    """``export`` and ``import`` under ``kiln ckpt``."""
    from kiln.hf.export import DEFAULT_MAX_SHARD_SIZE, DTYPES

    p = csub.add_parser("export", help="write a checkpoint as a Hugging Face Llama or Mixtral model directory "
                                       "(--hf OUT)",
                        description="Write the checkpoint's weights, config.json, generation_config.json and "
                                    "tokenizer as a Hugging Face LlamaForCausalLM directory, MixtralForCausalLM for "
                                    "an MoE model (any layout or engine; one process, no GPU).")
    p.add_argument("path", help=where)
    p.add_argument("--hf", required=True, metavar="OUT",
                   help="the directory to write (AutoModelForCausalLM.from_pretrained(OUT) loads it)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype (default: the run's train.precision; bf16 for fp8 runs)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                   help=f"split the weights into numbered safetensors files of at most SIZE, e.g. 2GB, 500MiB "
                        f"(default {DEFAULT_MAX_SHARD_SIZE}, as save_pretrained)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="the tokenizer.json to ship (default: the run's data.tokenizer, else kiln's bundled one)")
    p.add_argument("--no-checksums", action="store_true", help="verify file sizes only, not CRC32s, before exporting")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=cmd_export)

    p = csub.add_parser("import", help="make a kiln checkpoint (any layout, any engine) from a Hugging Face Llama "
                                       "or Mixtral model",
                        description="Make a step-0 kiln checkpoint in OUT from a Hugging Face Llama or Mixtral "
                                    "directory, for "
                                    "the layout and engine of CONFIG and overrides; continue pre-training with "
                                    "`kiln train CONFIG --resume-from OUT` (data starts at sample 0).")
    p.add_argument("--hf", required=True, metavar="DIR",
                   help="the Hugging Face model directory (config.json and safetensors weights)")
    p.add_argument("out", help="the checkpoint directory to write (it must not exist)")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML run config the checkpoint is for (default: kiln's defaults with the HF model); "
                        "its model settings must match the HF model's")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.tp=2")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="import with N worker processes (the layout's world size), as `kiln train` starts them")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=cmd_import, nnodes=None, max_restarts=0, rdzv_endpoint=None, rdzv_id=None)
