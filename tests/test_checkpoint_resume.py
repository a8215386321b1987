"""Checkpoints end to end, through `kiln train` as a user runs it.

* kill/resume: SIGKILL a worker under torchrun with restarts; the loss of every step equals an
  uninterrupted run of the same layout, bitwise;
* reshard: a checkpoint saved with TP=2, PP=2 or DP=2 continues with one process, and one
  saved with one process continues with TP=2, PP=2 or DP=2, on the uninterrupted loss (1e-5);
* a truncated or missing shard is detected and the previous checkpoint is used;
* SIGTERM saves at the current step and exits 75; the next launch continues.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from tests.kiln_run import TINY, kiln, read_metrics, start_kiln, train, worker_pid

pytestmark = pytest.mark.slow  # trains through the CLI (torchrun, gloo)

STEPS = 16
COMMON = ("train.log_every=1", "logging.wandb=disabled", f"train.max_steps={STEPS}")
LAYOUTS = {
    "single": (1, ()),
    "tp2": (2, ("parallel.tp=2",)),
    "pp2": (2, ("parallel.pp=2",)),
    "dp2": (2, ("optim.distributed_optimizer=true",)),  # the optimizer state is sharded over DP
}
# The single-process run with the distributed optimizer, to load DP-sharded optimizer state.
SINGLE_FOR = {"dp2": ("optim.distributed_optimizer=true",)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def references(tmp_path_factory, cache):
    """One uninterrupted run per layout, checkpointing every 4 steps, trained when first asked for
    (the layouts only the extended tier uses are not trained by `make test`)."""

    class Runs(dict):
        def __missing__(self, name):
            nproc, overrides = LAYOUTS[name]
            run_dir = tmp_path_factory.mktemp(f"ref-{name}")
            metrics = train(run_dir, nproc, *COMMON, *overrides, "checkpoint.every=4", cache_dir=cache)
            self[name] = (run_dir, [m["loss"] for m in metrics])
            return self[name]

    return Runs()


def _losses_by_step(metrics):
    return {m["step"]: m["loss"] for m in metrics}


def _assert_close(got: dict, want: list, steps, rel=1e-5):
    for step in steps:
        assert got[step] == pytest.approx(want[step - 1], rel=rel), f"step {step}: {got[step]} vs {want[step - 1]}"


@pytest.mark.parametrize("saved_with", ["tp2", pytest.param("pp2", marks=pytest.mark.extended),
                                        pytest.param("dp2", marks=pytest.mark.extended)])
def test_reshard_to_one_process(references, saved_with, tmp_path, cache):
    source = references[saved_with][0] / "checkpoints" / "step_000008"
    metrics = train(tmp_path / "run", 1, *COMMON, *SINGLE_FOR.get(saved_with, ()), f"checkpoint.resume_from={source}",
                    cache_dir=cache)
    got = _losses_by_step(metrics)
    assert sorted(got) == list(range(9, STEPS + 1))  # started after the checkpoint
    _assert_close(got, references["single"][1], got)


# Resharding onto one process (above) is in `make test`; from one process, all of it is extended.
@pytest.mark.parametrize("resume_with", [pytest.param("tp2", marks=pytest.mark.extended),
                                         pytest.param("pp2", marks=pytest.mark.extended),
                                         pytest.param("dp2", marks=pytest.mark.extended)])
def test_reshard_from_one_process(references, resume_with, tmp_path, cache):
    source = references["single"][0] / "checkpoints"  # a checkpoint root: its latest good step
    nproc, overrides = LAYOUTS[resume_with]
    overrides = tuple(o for o in overrides if "distributed_optimizer" not in o)  # saved with the plain optimizer
    metrics = train(tmp_path / "run", nproc, *COMMON, *overrides, "--resume-from",
                    str(source / "step_000008"), cache_dir=cache)
    got = _losses_by_step(metrics)
    assert sorted(got) == list(range(9, STEPS + 1))
    _assert_close(got, references["single"][1], got)


# dp2 (the distributed optimizer's sharded state) is in `make test-extended`.
@pytest.mark.parametrize("layout", ["tp2", pytest.param("dp2", marks=pytest.mark.extended)])
def test_killed_worker_restarts_and_resumes_bitwise(references, layout, tmp_path, cache):
    nproc, overrides = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    launcher = start_kiln("train", TINY, "--nproc-per-node", str(nproc), "--max-restarts", "1", *COMMON, *overrides,
                          "checkpoint.every=2", f"train.run_dir={run_dir}", cache_dir=cache)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step_000004").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "run ended before its step-4 checkpoint"
        time.sleep(0.02)
    os.kill(worker_pid(launcher.pid, rank=1), signal.SIGKILL)
    steps_at_kill = len(read_metrics(run_dir))
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-5000:]
    assert steps_at_kill < STEPS, "the kill came after training ended; it tested nothing"
    assert "resumed from" in output and "checkpoints/step_0000" in output
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # re-run steps replaced, not duplicated
    assert [m["loss"] for m in metrics] == references[layout][1]  # bitwise


def test_truncated_or_missing_shard_falls_back_to_previous(references, tmp_path, cache):
    run_dir = tmp_path / "run"
    shutil.copytree(references["single"][0] / "checkpoints", run_dir / "checkpoints")
    newest, middle = run_dir / "checkpoints" / "step_000016", run_dir / "checkpoints" / "step_000012"
    shard = sorted(newest.glob("__*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    sorted(middle.glob("__*.distcp"))[0].unlink()

    result = kiln("train", TINY, *COMMON, f"train.run_dir={run_dir}", cache_dir=cache)
    log = result.stdout + result.stderr
    assert "step_000016 is unusable" in log and "truncated" in log
    assert "step_000012 is unusable" in log and "missing" in log
    assert "resumed from" in log and "step_000008" in log
    assert (run_dir / "checkpoints" / ".step_000016.corrupt").is_dir()  # moved aside, not deleted
    got = _losses_by_step(read_metrics(run_dir))
    assert sorted(got) == list(range(9, STEPS + 1))
    assert [got[s] for s in got] == references["single"][1][8:]  # bitwise: same layout


@pytest.mark.extended  # `make test` has the stop on SIGUSR1 (test_stop_signals) and the real Slurm requeue
def test_sigterm_saves_current_step_and_next_launch_continues(references, tmp_path, cache):
    nproc, overrides = LAYOUTS["dp2"]
    run_dir = tmp_path / "run"
    args = ("train", TINY, "--nproc-per-node", str(nproc), *COMMON, *overrides, f"train.run_dir={run_dir}")
    launcher = start_kiln(*args, cache_dir=cache)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 3:
        assert launcher.poll() is None and time.monotonic() < deadline, "run ended before step 3"
        time.sleep(0.02)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 75, output[-5000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert stopped_at < STEPS
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["step"] == stopped_at and marker["signal"] == "SIGTERM"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"

    kiln(*args, cache_dir=cache)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in metrics] == references["dp2"][1]


def test_no_resume_refuses_to_mix_runs(references, tmp_path, cache):
    run_dir = tmp_path / "run"
    shutil.copytree(references["single"][0] / "checkpoints", run_dir / "checkpoints")
    result = kiln("train", TINY, *COMMON, f"train.run_dir={run_dir}", "--no-resume", cache_dir=cache, check=False)
    assert result.returncode == 2
    assert "already holds checkpoints" in result.stderr and "new train.run_dir" in result.stderr
