"""``kiln``: the one console entry point.

``kiln train CONFIG [key=value ...] [--nproc-per-node N] [--dry-run --world-size N]``

Under torchrun (or Slurm's srun with torchrun) it trains on the world it is given. Run directly
with ``--nproc-per-node N`` it validates the config, then starts torchrun itself (the elastic
agent included), so the same command works on a laptop and in a Slurm step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from kiln.data.prepare.cli import add_data_parser
from kiln.errors import KilnError

EXIT_CONFIG_ERROR = 2


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML run config")
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4 parallel.tp=2")
    p.add_argument("--nproc-per-node", type=int, default=None, help="start torchrun with N worker processes on this node")
    p.add_argument("--dry-run", action="store_true", help="validate and print the layout and parameter counts; start nothing")
    p.add_argument("--world-size", type=int, default=None, help="world size for --dry-run (default: --nproc-per-node or 1)")


def _inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def cmd_train(args: argparse.Namespace) -> int:
    from kiln.config import load_config

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        from kiln.plan.dry_run import dry_run_report

        print(dry_run_report(config, args.world_size or args.nproc_per_node or 1))
        return 0
    if args.nproc_per_node and not _inside_torchrun():
        from kiln.data.setup import check_data
        from kiln.parallel.layout import ParallelLayout

        # A broken layout, tokenizer or dataset stops here, before any process starts.
        ParallelLayout.from_config(config, args.nproc_per_node)
        check_data(config)
        return launch_torchrun(args)
    from kiln.train import run

    run(config)
    return 0


def launch_torchrun(args: argparse.Namespace) -> int:
    """Re-run this command under torchrun's elastic agent on a single node."""
    nproc = args.nproc_per_node
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={nproc}",
        "-m", "kiln.cli", "train", args.config, *args.overrides,
    ]
    env = dict(os.environ)
    # Share the cores between workers instead of letting each spawn a thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(command, env=env)


def main(argv: list[str] | None = None) -> int:
    from kiln.log import quiet_third_party

    quiet_third_party()  # before megatron-core is first imported
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: LLM pre-training on megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    add_data_parser(sub)
    # Overrides may come after options (`--nproc-per-node 2 optim.lr=1e-3`); argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or args.command != "train"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        handler = getattr(args, "handler", None) or {"train": cmd_train}[args.command]  # data commands set a handler
        return handler(args)
    except KilnError as err:
        print(f"kiln: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
