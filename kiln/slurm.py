"""``kiln slurm render``: slurm/kiln.sbatch with a cluster's #SBATCH settings and a run filled in.

The script itself is the template (``kiln/slurm.sbatch`` links to ``slurm/kiln.sbatch``), so a
rendered file and the shipped script never drift apart: render changes only its ``#SBATCH``
lines and two lines of the body, each found by its exact shipped text —

* ``run=()``: the run, ``CONFIG key=value ...`` (arguments given to sbatch still replace it);
* ``cpu_workers_per_node=1``: workers per node of a job without GPUs.

The run is checked as ``kiln train --dry-run`` would check it (config, overrides, and that the
layout divides nodes × workers per node), so a bad file is refused here, not in the queue.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from kiln.errors import KilnConfigError

TEMPLATE = Path(__file__).with_suffix(".sbatch")
RUN_LINE = "run=()"
CPU_WORKERS_LINE = "cpu_workers_per_node=1"
# Slurm's --time forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or "infinite").
TIME_FORMAT = re.compile(r"(\d+|\d+:\d+|\d+:\d+:\d+|\d+-\d+|\d+-\d+:\d+|\d+-\d+:\d+:\d+|infinite|unlimited)")
SBATCH_LINE = re.compile(r"#SBATCH --([a-z-]+)(?:=(.*))?")


def render(config: str, overrides: list[str], *, nodes: int = 1, gpus_per_node: int = 8,
           workers_per_node: int | None = None, partition: str | None = None, account: str | None = None,
           time: str | None = None, job_name: str | None = None) -> str:
    """The sbatch script for this run and these resources."""
    _check_resources(nodes, gpus_per_node, workers_per_node, partition, account, time, job_name)
    _check_run(config, overrides, nodes * (gpus_per_node or workers_per_node or 1))
    # --gpus-per-node=0 stays written: a CPU job then starts CPU workers even on a node with GPUs,
    # which --exclusive would otherwise hand it (SLURM_GPUS_ON_NODE).
    settings = {"job-name": job_name, "nodes": str(nodes), "gpus-per-node": str(gpus_per_node), "time": time,
                "partition": partition, "account": account}
    lines = _set_sbatch_options(TEMPLATE.read_text().splitlines(), settings)
    lines = _replace_line(lines, RUN_LINE, "run=(" + " ".join(shlex.quote(a) for a in [config, *overrides]) + ")")
    if workers_per_node is not None:
        lines = _replace_line(lines, CPU_WORKERS_LINE, f"cpu_workers_per_node={workers_per_node}")
    return "\n".join(lines) + "\n"


def _check_resources(nodes: int, gpus_per_node: int, workers_per_node: int | None, partition: str | None,
                     account: str | None, time: str | None, job_name: str | None) -> None:
    if nodes < 1:
        raise KilnConfigError(f"--nodes {nodes}: a job needs at least 1 node")
    if gpus_per_node < 0:
        raise KilnConfigError(f"--gpus-per-node {gpus_per_node}: use 0 for CPU nodes, else the GPUs per node")
    if workers_per_node is not None:
        if gpus_per_node:
            raise KilnConfigError(f"--workers-per-node {workers_per_node} with --gpus-per-node {gpus_per_node}: "
                                  f"GPU nodes run one worker per GPU; --workers-per-node is for --gpus-per-node 0")
        if workers_per_node < 1:
            raise KilnConfigError(f"--workers-per-node {workers_per_node}: a CPU node needs at least 1 worker")
    for flag, value in (("--partition", partition), ("--account", account), ("--job-name", job_name)):
        if value is not None and not re.fullmatch(r"[^\s=]+", value):
            raise KilnConfigError(f"{flag} {value!r}: Slurm names have no spaces or '='")
    if time is not None and not TIME_FORMAT.fullmatch(time):
        raise KilnConfigError(f"--time {time!r} is not a Slurm time; use minutes, HH:MM:SS or D-HH:MM:SS "
                              f"(e.g. 90, 12:00:00, 2-00:00:00)")


def _check_run(config: str, overrides: list[str], world_size: int) -> None:
    from kiln.config import load_config

    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise KilnConfigError(f"{' '.join(bad)}: overrides are key=value, e.g. optim.lr=3e-4")
    load_config(config, overrides).layout(world_size)  # a layout that does not divide the world stops here


def _set_sbatch_options(lines: list[str], settings: dict[str, str | None]) -> list[str]:
    """The #SBATCH lines with ``settings`` applied (None: keep the template's), new ones after the last."""
    pending = {key: value for key, value in settings.items() if value is not None}
    out, last = [], None
    for line in lines:
        match = SBATCH_LINE.fullmatch(line)
        if match:
            key = match.group(1)
            if key in pending:
                line = f"#SBATCH --{key}={pending.pop(key)}"
            last = len(out)
        out.append(line)
    if last is None:
        raise RuntimeError(f"{TEMPLATE} has no #SBATCH lines")
    out[last + 1:last + 1] = [f"#SBATCH --{key}={value}" for key, value in pending.items()]
    return out


def _replace_line(lines: list[str], old: str, new: str) -> list[str]:
    if lines.count(old) != 1:  # the template and this module are one change; a test holds them together
        raise RuntimeError(f"{TEMPLATE} must contain the line {old!r} exactly once")
    return [new if line == old else line for line in lines]


def cmd_render(args: argparse.Namespace) -> int:
    script = render(args.config, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                    workers_per_node=args.workers_per_node, partition=args.partition, account=args.account,
                    time=args.time, job_name=args.job_name)
    if args.output == "-":
        sys.stdout.write(script)
    else:
        out = Path(args.output)
        out.write_text(script)
        out.chmod(0o755)
        print(f"wrote {out}; submit it with: sbatch {out}", file=sys.stderr)
    return 0


def add_slurm_parser(sub) -> None:
    """Register ``kiln slurm render`` on the top-level subparsers."""
    slurm = sub.add_parser("slurm", help="Slurm: write a ready sbatch script for a run")
    ssub = slurm.add_subparsers(dest="slurm_command", required=True)
    p = ssub.add_parser("render", help="slurm/kiln.sbatch with these #SBATCH settings and this run filled in")
    p.add_argument("config", help="YAML run config, as the job will see it (relative to where you run sbatch)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.tp=8")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node, one worker each (default 8); 0 for CPU nodes")
    p.add_argument("--workers-per-node", type=int, default=None,
                   help="workers per CPU node, with --gpus-per-node 0 (default 1)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    p.add_argument("--account", default=None, help="Slurm account to charge (default: yours)")
    p.add_argument("--time", default=None, help="time limit, e.g. 12:00:00 or 2-00:00:00 (default 24:00:00)")
    p.add_argument("--job-name", default=None, help="job name; the run directory is runs/<job name>-<job id>")
    p.add_argument("-o", "--output", default="-", help="file to write (default: standard output)")
    p.set_defaults(handler=cmd_render)
