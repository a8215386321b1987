"""The `kiln data …` subcommands: train-tokenizer, prepare, stats.

``kiln/cli.py`` calls :func:`add_data_parser` once; each subcommand sets ``args.handler``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from kiln.errors import KilnDataError
from kiln.log import PROGRESS_MODES


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[kiln] %(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from kiln.data.prepare.config import load_prepare_config
    from kiln.data.prepare.tokenizer import train_tokenizer

    _setup_logging()
    cfg = load_prepare_config(args.config)
    path = train_tokenizer(args.inputs, args.vocab_size, args.out, cfg, fim_tokens=not args.no_fim_tokens)
    print(path)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from kiln.data.prepare.config import load_prepare_config
    from kiln.data.prepare.pipeline import prepare
    from kiln.data.prepare.stats import format_stats

    _setup_logging()
    cfg = load_prepare_config(args.config, seq_len=args.seq_len, dedup=args.dedup)
    stats = prepare(args.inputs, args.out, args.tokenizer, cfg, workers=args.workers, overwrite=args.overwrite,
                    progress="off" if args.no_progress else args.progress)
    print(format_stats(stats))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from kiln.data.prepare.pipeline import STATS_FILE
    from kiln.data.prepare.stats import format_stats

    path = os.path.join(args.dir, STATS_FILE)
    if not os.path.isfile(path):
        raise KilnDataError(f"{args.dir} has no {STATS_FILE} (was it made by `kiln data prepare`?)")
    with open(path, encoding="utf-8") as f:
        stats = json.load(f)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def add_data_parser(sub) -> None:
    """Register ``kiln data {train-tokenizer,prepare,stats}`` on the top-level subparsers."""
    data = sub.add_parser("data", help="tokenizers and datasets: train-tokenizer, prepare, stats")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text/JSONL/Parquet inputs")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories (recursive) or globs")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="directory for tokenizer.json")
    p.add_argument("--config", default=None, help="prepare YAML config (input.* and normalize.* apply)")
    p.add_argument("--no-fim-tokens", action="store_true", help="do not add the <|fim_*|> special tokens")
    p.set_defaults(handler=cmd_train_tokenizer)

    p = dsub.add_parser("prepare", help="tokenize, clean, dedup and pack inputs into MDS shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories (recursive) or globs")
    p.add_argument("--out", required=True, help="output dataset directory (appears only when complete)")
    p.add_argument("--tokenizer", required=True, help="local tokenizer.json")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the usable cores)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (overrides pack.seq_len)")
    p.add_argument("--dedup", choices=("exact", "near", "none"), default=None, help="overrides dedup.mode")
    p.add_argument("--config", default=None, help="YAML config of the cleaning, dedup, FIM and packing steps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                   help="bar: a live line with ETA on stderr; plain: a log line every 30 s; auto (default): bar on "
                        "a terminal outside Slurm, else plain")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.set_defaults(handler=cmd_prepare)

    p = dsub.add_parser("stats", help="print the stats report of a prepared dataset")
    p.add_argument("dir", help="dataset directory")
    p.add_argument("--json", action="store_true", help="print the raw stats.json")
    p.set_defaults(handler=cmd_stats)
