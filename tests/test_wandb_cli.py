"""W&B through `kiln train` as a user runs it: a worker SIGKILLed mid-run loses no W&B history.

Rank 0 (the writer of metrics.jsonl) kills itself right after it logged step KILL_AT, once the
step-CHECKPOINT checkpoint is on disk, so the agent restarts both workers, they resume from that
checkpoint and run the steps after it again. A hook loaded into the first attempt's rank 0 (a
``sitecustomize`` on PYTHONPATH) does the kill: the moment is then a step, not a race with a poll.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from kiln.observe.wandb_records import history_rows, transaction_logs
from tests.kiln_run import REPO, TINY, read_metrics, start_kiln

pytestmark = pytest.mark.slow  # trains through the CLI (torchrun, gloo)

STEPS, CHECKPOINT, KILL_AT = 10, 3, 5

KILL_HOOK = f"""
import os

if os.environ.get("RANK") == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import signal
    from kiln.trainer import callbacks

    logged = callbacks.JsonlLogger.on_log

    def on_log_then_die(self, trainer, metrics):
        logged(self, trainer, metrics)  # the line is written and flushed
        if metrics["step"] == {KILL_AT}:
            os.kill(os.getpid(), signal.{signal.SIGKILL.name})

    callbacks.JsonlLogger.on_log = on_log_then_die
"""


def test_killed_rank0_worker_leaves_every_step_in_wandb_once(tmp_path, monkeypatch):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(KILL_HOOK)
    monkeypatch.setenv("PYTHONPATH", ":".join(filter(None, [str(hook_dir), str(REPO), os.environ.get("PYTHONPATH")])))
    run_dir = tmp_path / "run"
    launcher = start_kiln("train", TINY, "--nproc-per-node", "2", "--max-restarts", "1", f"train.max_steps={STEPS}",
                          "train.log_every=1", f"checkpoint.every={CHECKPOINT}", "checkpoint.async=false",
                          "logging.wandb=offline", f"train.run_dir={run_dir}", cache_dir=tmp_path / "cache")
    output, _ = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, output[-5000:]
    assert "resumed from" in output and f"step_{CHECKPOINT:06d}" in output, "the worker was not killed and restarted"

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    logs = transaction_logs(run_dir / "wandb", run_id)
    assert sorted(p.name for p in (run_dir / "wandb").rglob("*.wandb")) == [f"run-{run_id}.wandb"] * len(logs)
    rows = [row for path in logs for row in history_rows(path)]
    assert [step for step, _ in rows] == list(range(1, STEPS + 1))  # each step once, in order
    assert [json.loads(row["train/loss"]) for _, row in rows] == [m["loss"] for m in metrics]
    assert len(logs) == 1, "the workers opened W&B runs of their own"
