"""What ``kiln generate`` and ``kiln eval`` share on the command line: the checkpoint argument,
overrides, ``--nproc-per-node`` (a relaunch under torchrun through ``kiln train``'s launcher),
and running the command's body on this rank."""

from __future__ import annotations

import argparse
from typing import Callable

CHECKPOINT_HELP = ("a step directory (…/checkpoints/step_000100), a checkpoint directory or a run directory "
                   "(then its latest step)")


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the checkpoint's run config, e.g. parallel.tp=2 train.device=cpu")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start torchrun with N worker processes (e.g. 2 with parallel.tp=2)")
    # What kiln train's launcher reads; inference runs on one node.
    p.set_defaults(nnodes=None, rdzv_endpoint=None, rdzv_id=None, max_restarts=0)


def run_on_ranks(args: argparse.Namespace, config, worker_args: list[str], body: Callable) -> int:
    """``body(ctx)`` on this rank, or, with ``--nproc-per-node`` outside torchrun, the command
    ``worker_args`` relaunched on that many workers (after its layout is checked here)."""
    from kiln.cli import inside_torchrun, launch_torchrun
    from kiln.parallel.backend import destroy_parallel
    from kiln.train import check_environment

    from kiln.inference.load import start_rank

    if args.nproc_per_node and not inside_torchrun():
        config.layout(args.nproc_per_node)  # a layout the world cannot hold stops here, with exit code 2
        check_environment(config)
        return launch_torchrun(args, config, worker_args)
    ctx = start_rank(config)
    try:
        body(ctx)
    finally:
        destroy_parallel()
    return 0
