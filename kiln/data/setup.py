"""The trainer's view of data: this rank's stream of micro-batches and the vocabulary size."""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from kiln.config import RunConfig
from kiln.errors import KilnDataError

log = logging.getLogger("kiln")


def check_data(config: RunConfig) -> int:
    """Fail fast, before any process starts: the tokenizer and a local dataset must be readable
    and agree with the model. Returns the vocabulary size."""
    from kiln.data.loader import dataset_seq_len
    from kiln.plan.dry_run import resolve_vocab_size

    vocab_size = resolve_vocab_size(config)
    path = config.data.path
    if path and "://" not in path:
        stored = dataset_seq_len(path)
        if stored != config.model.seq_len:
            raise KilnDataError(
                f"dataset {path} holds samples of {stored} tokens but model.seq_len is {config.model.seq_len}; "
                f"set model.seq_len={stored} or prepare the data again with --seq-len {config.model.seq_len}"
            )
    return vocab_size


def build_batches(config: RunConfig, ctx) -> tuple[Iterator[dict[str, torch.Tensor]], int]:
    """Micro-batches for this rank (shared by its whole data-parallel replica), and the vocab size."""
    from kiln.data.bundled import ensure_bundled_dataset
    from kiln.data.loader import build_train_loader

    vocab_size = check_data(config)
    seq_len = config.model.seq_len
    path = config.data.path or ensure_bundled_dataset(seq_len)
    layout, coords = ctx.layout, ctx.coords
    loader = build_train_loader(
        path,
        micro_batch_size=config.train.micro_batch_size,
        seed=config.train.seed,
        shuffle=config.data.shuffle,
        dp_rank=coords["dp"],
        dp_size=layout.dp,
        replication=layout.replica_size,
        num_workers=config.data.num_workers,
        global_batch_size=config.train.global_batch_size,
    )
    if ctx.rank == 0:
        log.info(f"data: {path} (seq_len {seq_len}, {layout.dp} data-parallel replica(s))")
    return iter(loader), vocab_size
