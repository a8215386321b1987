"""``kiln eval CKPT [--data DIR]``: loss and perplexity of a checkpoint on an MDS dataset.

The number is training's ``val_loss``, computed the same way: the validation loader
(:func:`kiln.data.setup.build_val_loader`: the checkpoint's micro-batch size, seed and
document masking, in dataset order), the run's engine forward (``eval_losses``, any TP/PP/CP/DP
layout), and the same average: the mean over micro-batches of each micro-batch's mean
per-token loss, over every data-parallel rank. Each micro-batch holds micro_batch_size × seq_len
tokens and every token counts (no loss mask), so this is also the mean over all evaluated
tokens. Perplexity is exp(loss).

What is evaluated: ``--max-batches N`` micro-batches in all (N // dp per data-parallel rank);
else, without ``--data``, the validation set of the checkpoint's run exactly as training
evaluated it (data.val.batches per rank × its dp), so the result equals metrics.jsonl's
val_loss at the checkpoint's step; else one pass over DIR.

The engine is built around the loaded weights (its optimizer never steps and reads no state
from the checkpoint) so that the forward is the one training validated with.
"""

from __future__ import annotations

import argparse
import json
import logging
import math

from kiln.errors import KilnConfigError, KilnDataError

log = logging.getLogger("kiln")

EVAL_CHUNK = 16  # micro-batches per engine call: a long evaluation never holds all its batches


def micro_batches_per_rank(opened, data_path: str, max_batches: int | None, dp: int) -> int:
    """How many micro-batches each data-parallel rank evaluates (see the module docstring)."""
    from kiln.data.pack import read_meta

    config = opened.config
    in_data = int(read_meta(data_path)["samples"]) // config.train.micro_batch_size
    if max_batches is not None:
        total = min(max_batches, in_data)  # "at most": the loader would go round the data again
    elif data_path == opened.meta["config"]["data"]["val"]["path"]:
        total = config.data.val.batches * int(opened.meta["layout"]["dp"])  # what training evaluated
    else:
        total = in_data
    if total < dp:
        raise KilnConfigError(f"{total} micro-batches cannot be split over {dp} data-parallel ranks; evaluate at least "
                              f"{dp} (--max-batches) or use fewer processes")
    return total // dp


def check_eval_data(path: str, seq_len: int) -> None:
    """DIR must be a kiln MDS dataset of the model's sample length (before any process starts)."""
    from kiln.data.loader import dataset_seq_len

    stored = dataset_seq_len(path)  # a KilnDataError naming `kiln data prepare` when it is not a dataset
    if stored != seq_len:
        raise KilnDataError(f"dataset {path} holds samples of {stored} tokens but the checkpoint's model.seq_len is "
                            f"{seq_len}; prepare it again with `kiln data prepare … --seq-len {seq_len}`")


def evaluate(engine, loader, batches_per_rank: int) -> float:
    """Training's validation average over this rank's next ``batches_per_rank`` micro-batches (collective)."""
    from kiln.parallel import collectives

    losses: list[float] = []
    for start in range(0, batches_per_rank, EVAL_CHUNK):
        chunk = [next(loader) for _ in range(min(EVAL_CHUNK, batches_per_rank - start))]
        losses += engine.eval_losses(chunk)
    return collectives.mean_over_holders(sum(losses) / len(losses) if losses else None)


def cmd_eval(args: argparse.Namespace) -> int:
    from kiln.inference.command import run_on_ranks
    from kiln.inference.load import load_model, open_checkpoint

    if args.max_batches is not None and args.max_batches < 1:
        raise KilnConfigError(f"--max-batches must be >= 1, got {args.max_batches}")
    opened = open_checkpoint(args.checkpoint, args.overrides)
    config = opened.config
    data_path = args.data or config.data.val.path
    if not data_path:
        raise KilnConfigError(f"the run of {opened.step_dir} had no validation data (data.val.path); pass --data DIR, "
                              f"an MDS dataset made by `kiln data prepare`")
    check_eval_data(data_path, config.model.seq_len)
    config.data.val.path = data_path

    def body(ctx) -> None:
        from kiln.data.setup import build_val_loader
        from kiln.train import build_run_engine

        parts, vocab_size = load_model(opened, ctx)
        engine = build_run_engine(config, ctx, vocab_size, model_parts=parts)
        per_rank = micro_batches_per_rank(opened, data_path, args.max_batches, ctx.layout.dp)
        loader = build_val_loader(config.data, config.train, ctx)
        try:
            loss = evaluate(engine, loader, per_rank)
        finally:
            loader.close()
            engine.close()
        micro_batches = per_rank * ctx.layout.dp
        report = {"checkpoint": str(opened.step_dir), "step": opened.step, "data": data_path,
                  "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
                  "micro_batches": micro_batches, "samples": micro_batches * config.train.micro_batch_size,
                  "tokens": micro_batches * config.train.micro_batch_size * config.model.seq_len}
        if ctx.rank == 0:
            print(json.dumps(report) if args.json else
                  f"loss {loss:.6f}  perplexity {report['perplexity']:.3f}  ({report['tokens']:,} tokens in "
                  f"{micro_batches} micro-batches of {config.train.micro_batch_size}; {data_path}; "
                  f"step {opened.step} of {opened.step_dir})", flush=True)

    worker_args = ["eval", args.checkpoint, f"--data={data_path}", *(["--json"] if args.json else []),
                   *([f"--max-batches={args.max_batches}"] if args.max_batches is not None else []), *args.overrides]
    return run_on_ranks(args, config, worker_args, body)


def add_eval_parser(sub) -> None:
    from kiln.inference.command import add_common_arguments

    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint on an MDS dataset (training's val_loss)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument("--data", default=None, metavar="DIR",
                   help="MDS dataset (`kiln data prepare` output); default: the run's validation data (data.val.path)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="evaluate N micro-batches in all (default: as training validated, or all of DIR)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_eval)
