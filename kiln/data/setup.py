"""The trainer's view of data: this rank's stream of micro-batches and the vocabulary size."""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from kiln.config import DataConfig, ModelConfig, TrainConfig
from kiln.errors import KilnDataError

log = logging.getLogger("kiln")


def training_source(data: DataConfig) -> str | list[dict] | None:
    """data.path, or data.streams as plain dicts; None means the bundled corpus."""
    if data.streams:
        return [{"path": s.path, "proportion": s.proportion, "repeat": s.repeat} for s in data.streams]
    return data.path


def check_data(data: DataConfig, model: ModelConfig) -> int:
    """Fail fast, before any process starts: the tokenizer and every local dataset (training
    streams and validation) must be readable and agree with the model. Returns the vocab size."""
    from kiln.data.loader import dataset_seq_len
    from kiln.plan.dry_run import resolve_vocab_size

    vocab_size = resolve_vocab_size(model, data)
    source = training_source(data)
    paths = [source] if isinstance(source, str) else [s["path"] for s in source or []]
    if data.val.path:
        paths.append(data.val.path)
    for path in paths:
        if "://" in path:
            continue
        stored = dataset_seq_len(path)
        if stored != model.seq_len:
            raise KilnDataError(
                f"dataset {path} holds samples of {stored} tokens but model.seq_len is {model.seq_len}; "
                f"set model.seq_len={stored} or prepare the data again with --seq-len {model.seq_len}"
            )
    return vocab_size


def build_batches(data: DataConfig, train: TrainConfig, model: ModelConfig,
                  ctx) -> tuple[Iterator[dict[str, torch.Tensor]], int]:
    """Micro-batches for this rank (shared by its whole data-parallel replica), and the vocab size."""
    from kiln.data.bundled import ensure_bundled_dataset
    from kiln.data.loader import build_train_loader

    vocab_size = check_data(data, model)
    seq_len = model.seq_len
    source = training_source(data) or ensure_bundled_dataset(seq_len)
    layout, coords = ctx.layout, ctx.coords
    loader = build_train_loader(
        source,
        micro_batch_size=train.micro_batch_size,
        seed=train.seed,
        shuffle=data.shuffle,
        dp_rank=coords["dp"],
        dp_size=layout.dp,
        replication=layout.replica_size,
        num_workers=data.num_workers,
        prefetch=data.prefetch,
        global_batch_size=train.global_batch_size,
        # Pinned in the read-ahead thread, off the step's path (pageable memory makes
        # non_blocking copies synchronous).
        pin_memory=ctx.device.type == "cuda",
        documents=data.reset_attention_at_eos,
    )
    if ctx.rank == 0:
        what = source if isinstance(source, str) else ", ".join(
            f"{s['path']} ({'proportion ' + str(s['proportion']) if s['proportion'] else 'repeat ' + str(s['repeat'] or 1)})"
            for s in source)
        log.info(f"data: {what} (seq_len {seq_len}, {layout.dp} data-parallel replica(s))")
    return iter(loader), vocab_size


def build_val_loader(data: DataConfig, train: TrainConfig, ctx):
    """This rank's stream of validation micro-batches over data.val.path, unshuffled (collective).
    ``kiln eval`` reads through it too, so its numbers are training's val_loss."""
    from kiln.data.loader import build_train_loader

    return build_train_loader(
        data.val.path,
        micro_batch_size=train.micro_batch_size,
        seed=train.seed,
        shuffle=False,
        dp_rank=ctx.coords["dp"],
        dp_size=ctx.layout.dp,
        replication=ctx.layout.replica_size,
        documents=data.reset_attention_at_eos,
    )


def build_val_batches(data: DataConfig, train: TrainConfig, ctx) -> list[dict[str, torch.Tensor]] | None:
    """This rank's validation micro-batches, read once and kept: every evaluation sees the same ones."""
    val = data.val
    if not val.path:
        return None
    layout = ctx.layout
    loader = build_val_loader(data, train, ctx)
    batches = [next(loader) for _ in range(val.batches)]
    if ctx.rank == 0:
        total = val.batches * train.micro_batch_size * layout.dp
        log.info(f"validation: {val.path}, {total} samples per evaluation")
    return batches
