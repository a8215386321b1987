"""Run the `kiln` CLI exactly as a user would, in a subprocess, and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
TINY_MOE = str(REPO / "configs" / "tiny-moe.yaml")
# Parity runs: fp32, a loss logged every step, and a global batch of 8 = micro-batch 4 × 2
# micro-batches on one rank, or 4 × 1 on each of 2 DP ranks.
PARITY_SETTINGS = (
    "train.log_every=1",
    "train.precision=fp32",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "optim.warmup_steps=2",
    "logging.wandb=disabled",
)


def assert_same_losses(reference: list[dict], candidate: list[dict], last_step: int, first_step: int = 1,
                       rel_tol: float = 1e-4) -> None:
    """Every logged step of ``candidate`` (first_step..last_step) has the reference's loss (rel_tol)
    and gradient norm (1e-3 relative)."""
    import pytest

    assert [m["step"] for m in candidate] == list(range(first_step, last_step + 1))
    by_step = {m["step"]: m for m in reference}
    for got in candidate:
        ref = by_step[got["step"]]
        rel = abs(got["loss"] - ref["loss"]) / abs(ref["loss"])
        assert rel < rel_tol, f"step {got['step']}: loss {got['loss']:.7f} vs reference {ref['loss']:.7f} (rel {rel:.2e})"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)


def kiln(*args: str, cache_dir: Path | None = None, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    if cache_dir is not None:
        env["KILN_CACHE_DIR"] = str(cache_dir)
    result = subprocess.run(
        [sys.executable, "-m", "kiln", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def train(run_dir: Path, nproc: int, *overrides: str, cache_dir: Path, config: str = TINY) -> list[dict]:
    """Train with `kiln train --nproc-per-node N` and return the metrics.jsonl records."""
    kiln("train", config, "--nproc-per-node", str(nproc), f"train.run_dir={run_dir}", *overrides, cache_dir=cache_dir)
    return read_metrics(run_dir)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> list[dict]:
    """The step records of metrics.jsonl (without events such as the guard's)."""
    from kiln.trainer.callbacks import is_event

    return [record for record in _records(run_dir) if not is_event(record)]


def read_events(run_dir: Path) -> list[dict]:
    from kiln.trainer.callbacks import is_event

    return [record for record in _records(run_dir) if is_event(record)]


def start_kiln(*args: str, cache_dir: Path) -> subprocess.Popen:
    """`kiln ...` in the background (for tests that signal or kill it while it trains)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", KILN_CACHE_DIR=str(cache_dir))
    return subprocess.Popen([sys.executable, "-m", "kiln", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: ppid
                found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants: the processes Slurm signals in a job step."""
    tree = [pid]
    for child in _children(pid):
        tree += process_tree(child)
    return tree


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The torchrun worker of global ``rank`` under a `kiln train --nproc-per-node` process."""
    for agent in _children(launcher_pid):
        for worker in _children(agent):
            environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return worker
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")

