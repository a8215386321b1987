"""``kiln``: the one console entry point.

``kiln train CONFIG [key=value ...] [--nproc-per-node N] [--dry-run --world-size N]``
(also ``kiln generate`` and ``kiln eval`` on a checkpoint: kiln.inference)

Under torchrun (or Slurm's srun with torchrun) it trains on the world it is given. Run directly
with ``--nproc-per-node N`` it validates the config, then starts torchrun itself (the elastic
agent included), so the same command works on a laptop and in a Slurm step.

Exit codes: 0 done; 2 bad config, data or checkpoint (nothing started); 3 stopped by the loss
guard (more bad steps than guard.max_retries; see guard.jsonl); 75 stopped by SIGTERM/SIGUSR1
after saving a checkpoint (relaunch to continue); 124 hung: a step overran the ``watchdog:``
allowance, every rank's stacks are in <run_dir>/logs (kiln.trainer.watchdog); anything else: a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from kiln.checkpoint.tools import add_ckpt_parser
from kiln.data.prepare.cli import add_data_parser
from kiln.errors import KilnConfigError, KilnError
from kiln.inference.evaluate import add_eval_parser
from kiln.inference.generate import add_generate_parser
from kiln.plan.cli import add_plan_parser
from kiln.slurm import add_slurm_parser

EXIT_CONFIG_ERROR = 2
PREEMPTED_MARKER = "preempted.json"


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML run config")
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4 parallel.tp=2")
    p.add_argument("--nproc-per-node", type=int, default=None, help="start torchrun with N worker processes on this node")
    p.add_argument("--dry-run", action="store_true", help="validate and print the layout and parameter counts; start nothing")
    p.add_argument("--world-size", type=int, default=None, help="world size for --dry-run (default: --nproc-per-node or 1)")
    p.add_argument("--resume-from", default=None, metavar="PATH",
                   help="start from this checkpoint (step dir or checkpoint dir) if the run has none of its own")
    p.add_argument("--no-resume", action="store_true", help="do not resume from checkpoints in the run directory")
    p.add_argument("--no-memory-check", action="store_true",
                   help="launch even when kiln plan predicts the layout will not fit the device memory")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts the workers up to N times after a failure")
    p.add_argument("--nnodes", default=None, help="nodes, N or MIN:MAX (multi-node: also --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="c10d rendezvous of a multi-node run")
    p.add_argument("--rdzv-id", default=None, help="rendezvous id shared by the nodes (default: $SLURM_JOB_ID)")


def inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _checkpoint_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.resume_from:
        extra.append(f"checkpoint.resume_from={args.resume_from}")
    if args.no_resume:
        extra.append("checkpoint.resume=false")
    if getattr(args, "no_memory_check", False):
        extra.append("train.memory_check=false")
    return extra


def cmd_train(args: argparse.Namespace) -> int:
    from kiln.config import load_config

    args.overrides = [*args.overrides, *_checkpoint_overrides(args)]
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(config.dry_run_report(args.world_size or args.nproc_per_node or 1))
        return 0
    if args.nproc_per_node and not inside_torchrun():
        from kiln.checkpoint.manager import check_resume_settings
        from kiln.data.setup import check_data
        from kiln.engine import engine_class
        from kiln.train import check_environment

        # A broken layout, machine, tokenizer or dataset stops here, before any process starts.
        nodes = int(str(args.nnodes or 1).split(":")[-1])
        config.layout(args.nproc_per_node * nodes)
        device_type = check_environment(config)
        check_data(config.data, config.model)
        from kiln.plan.planner import MEMORY_CHECKED, check_memory_before_launch

        memory_checked = check_memory_before_launch(config, args.nproc_per_node * nodes, args.nproc_per_node,
                                                    device_type)
        check_resume_settings(config.checkpoint, config.train.run_dir, engine_class(config.parallel.engine))
        if not config.train.run_dir:  # fixed here so every restart of the workers finds the same run
            from kiln.train import default_run_dir

            config.train.run_dir = default_run_dir(config)
            args.overrides.append(f"train.run_dir={config.train.run_dir}")
        if memory_checked:
            os.environ[MEMORY_CHECKED] = "1"  # the workers inherit it and skip their own check
        return launch_torchrun(args, config)
    from kiln.train import run
    from kiln.trainer.preemption import EXIT_PREEMPTED, TrainingPreempted

    from kiln.trainer.guard import EXIT_GUARD_STOPPED, GuardStop

    try:
        run(config)
    except GuardStop as stop:
        print(f"kiln: {stop}", file=sys.stderr)
        return EXIT_GUARD_STOPPED
    except TrainingPreempted as stop:
        if os.environ.get("RANK", "0") == "0":  # every rank stopped at the same step; one says so
            marker = {"step": stop.step, "signal": signal.Signals(stop.signum).name,
                      "launch_id": os.environ.get("KILN_LAUNCH_ID")}
            (Path(config.train.run_dir) / PREEMPTED_MARKER).write_text(json.dumps(marker) + "\n")
            print(f"kiln: {stop}; relaunch the same command to continue", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def launch_torchrun(args: argparse.Namespace, config, worker_args: list[str] | None = None) -> int:
    """Re-run this command (or ``kiln <worker_args>``) under torchrun's elastic agent; forward stop
    signals to it.

    ``worker_args``: the kiln command line each worker runs (default: this ``kiln train``'s).

    torchrun is told to handle SIGUSR1 as well as SIGTERM (by default it dies on SIGUSR1,
    orphaning the workers) and to give the workers ``checkpoint.signal_timeout_s`` to save.
    """
    from kiln.trainer.preemption import EXIT_PREEMPTED, STOP_SIGNALS

    nproc = args.nproc_per_node
    if args.nnodes:
        if not args.rdzv_endpoint:
            raise KilnConfigError("--nnodes needs --rdzv-endpoint HOST:PORT (the first node's address, e.g. "
                                  "$(scontrol show hostnames $SLURM_NODELIST | head -n1):29500)")
        rdzv_id = args.rdzv_id or os.environ.get("SLURM_JOB_ID") or "kiln"
        where = [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id}"]
    else:
        where = ["--standalone"]
    command = [
        sys.executable, "-m", "kiln.torchrun_agent", *where,  # torchrun, one clean stop per signal
        f"--nproc-per-node={nproc}", f"--max-restarts={args.max_restarts}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"--shutdown-timeout={config.checkpoint.signal_timeout_s}",
        "-m", "kiln.cli", *(worker_args or ["train", args.config, *args.overrides]),
    ]
    launch_id = uuid.uuid4().hex
    from kiln.parallel.backend import worker_environment

    env = dict(os.environ, KILN_LAUNCH_ID=launch_id,
               **worker_environment(config.parallel, config.train.device, config.train.run_dir))
    # With the rendezvous store shared into the workers (torchrun's default), restarted workers
    # read the dead attempt's addresses and fail to connect (pytorch/pytorch#135712).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # Share the cores between workers instead of letting each spawn a thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    from kiln.observe.wandb_shipper import SHIPPED_BY_LAUNCHER, launcher_shipper

    env[SHIPPED_BY_LAUNCHER] = "1"  # this process outlives the workers: it ships metrics.jsonl to W&B
    shipper = launcher_shipper(config)  # None on all nodes but the first
    agent = subprocess.Popen(command, env=env)
    def forward(signum, frame):
        agent.send_signal(signum)  # the agent passes it to the workers and waits for their save

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        code = agent.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if shipper is not None:
            shipper.stop()  # the workers are gone: ship the rest of metrics.jsonl, finish the W&B run
    # torchrun reports any worker failure as 1; the workers' markers say why they stopped.
    from kiln.trainer.watchdog import EXIT_HUNG, HUNG_MARKER

    if code == 0 or not config.train.run_dir:  # no run directory (kiln generate, eval): no markers
        return code
    run_dir = Path(config.train.run_dir)
    if _written_by_launch(run_dir / PREEMPTED_MARKER, launch_id):
        return EXIT_PREEMPTED
    if _written_by_launch(run_dir / HUNG_MARKER, launch_id):
        return EXIT_HUNG
    return code


def _written_by_launch(marker: Path, launch_id: str) -> bool:
    """Whether the JSON marker file exists and was written by the workers of this launch."""
    try:
        return json.loads(marker.read_text()).get("launch_id") == launch_id
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    from kiln.log import quiet_third_party

    quiet_third_party()  # before megatron-core is first imported
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: LLM pre-training on megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    add_data_parser(sub)
    add_ckpt_parser(sub)
    add_slurm_parser(sub)
    add_plan_parser(sub)
    add_generate_parser(sub)
    add_eval_parser(sub)
    # Overrides may come after options (`--nproc-per-node 2 optim.lr=1e-3`); argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
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
