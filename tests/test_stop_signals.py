"""A stop signal as Slurm delivers it: to every process of the job step at once (the `kiln train`
launcher, torchrun's agent, the workers and their helpers), as `scancel --signal=USR1` and the
time-limit warning `--signal=USR1@300` do. kiln saves, exits 75, names the signal that arrived
(not the SIGTERM torchrun's agent sends as it shuts down) and prints no traceback."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.kiln_run import TINY, process_tree, read_metrics, start_kiln

pytestmark = pytest.mark.slow  # trains through the CLI (torchrun, gloo)


def test_sigusr1_to_the_whole_step_saves_exits_75_and_names_sigusr1(tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_kiln("train", TINY, "--nproc-per-node", "2", f"train.run_dir={run_dir}", "train.max_steps=300",
                          "train.log_every=1", "logging.wandb=disabled", cache_dir=tmp_path / "cache")
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.02)
    tree = process_tree(launcher.pid)
    assert len(tree) >= 4, f"expected launcher, agent and 2 workers, found {tree}"
    for pid in tree:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass  # a short-lived helper that ended meanwhile
    output, _ = launcher.communicate(timeout=600)

    assert launcher.returncode == 75, output[-5000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert json.loads((run_dir / "preempted.json").read_text())["signal"] == "SIGUSR1"
    assert f"kiln: stopped by SIGUSR1 after step {stopped_at}; checkpoint saved" in output, output[-5000:]
    assert "SIGTERM" not in output, output[-5000:]  # torchrun's agent did not shut the workers down twice
    assert "Traceback" not in output, output[-5000:]
