"""slurm/kiln.sbatch on a real single-node Slurm cluster (tests/slurm_cluster.py), submitted with
sbatch as the README tells a user to.

* The time-limit warning: `scancel --signal=USR1` signals the job's steps exactly as Slurm's
  `--signal=USR1@300` does. kiln saves and exits 75, the script requeues the job, the job runs
  again from that checkpoint and finishes with the losses of an uninterrupted run, step for step;
  its output names SIGUSR1 and holds no traceback.
* Workers per node follow the GPUs the job asks for, on a node with (count-only) GPUs, and a
  file from `kiln slurm render --gpus-per-node 0 --workers-per-node 2` runs 2 CPU workers.
"""

from __future__ import annotations

import random
import re
import socket
import sys
import time

import pytest

from kiln.slurm import render
from tests.kiln_run import REPO, TINY, read_metrics, start_kiln
from tests.slurm_cluster import POLL_S, SlurmCluster, SlurmUnavailable, ensure_installed

pytestmark = pytest.mark.slurm

SBATCH = REPO / "slurm" / "kiln.sbatch"
STEPS = 12
SETTINGS = (f"train.max_steps={STEPS}", "train.log_every=1", "checkpoint.every=4", "logging.wandb=disabled")


def start_cluster(**kwargs) -> SlurmCluster:
    try:
        ensure_installed()
        cluster = SlurmCluster(**kwargs)
    except SlurmUnavailable as why:
        pytest.skip(f"no Slurm test cluster: {why}")
    try:
        cluster.start()
    except Exception as why:  # the daemons did not come up here: not a failure of kiln
        cluster.stop()
        pytest.skip(f"no Slurm test cluster: {type(why).__name__}: {why}")
    return cluster


@pytest.fixture(scope="module")
def slurm():
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def slurm_with_gpus():
    cluster = start_cluster(gpus=2)  # count-only GPUs: enough for Slurm's allocation and variables
    yield cluster
    cluster.stop()


@pytest.fixture
def job_env(tmp_path):
    """What the job needs beyond the cluster's environment: this checkout's kiln, its own cache and port."""
    kiln = tmp_path / "kiln"
    kiln.write_text(f'#!/bin/bash\nexec {sys.executable} -m kiln "$@"\n')
    kiln.chmod(0o755)
    return dict(KILN=str(kiln), PYTHONPATH=str(REPO), KILN_CACHE_DIR=str(tmp_path / "cache"),
                KILN_RDZV_PORT=str(rendezvous_port()), OMP_NUM_THREADS="1", WANDB_SILENT="true")


def rendezvous_port() -> int:
    """A free port below Linux's ephemeral range (32768 and up): a port the kernel handed out
    (free_port) may meanwhile be any process's outgoing connection, and the c10d store can no
    longer bind it (the reference run beside the job opens dozens)."""
    for _ in range(100):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
                return port
            except OSError:
                continue
    raise AssertionError("no free port in 20000-32000")


def wait_for_steps(run_dir, steps: int, job_id: str, slurm: SlurmCluster) -> None:
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < steps:
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state} before step {steps}\n{slurm.log_tails(30)}"
        time.sleep(POLL_S)


@pytest.mark.slow  # trains through the CLI (torchrun, gloo), three launches
def test_time_limit_signal_saves_requeues_and_resumes_on_the_same_losses(slurm, job_env, tmp_path):
    # The uninterrupted run, alongside the job (same layout: 2 processes, dp 2).
    reference = start_kiln("train", TINY, "--nproc-per-node", "2", f"train.run_dir={tmp_path / 'reference'}",
                           *SETTINGS, cache_dir=tmp_path / "reference-cache")
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    job_id = slurm.sbatch("--gpus-per-node=0", "--export=ALL,KILN_NPROC_PER_NODE=2", "--time=30",
                          f"--output={output}", str(SBATCH), TINY, *SETTINGS, cwd=REPO,
                          env=dict(slurm.env, **job_env, KILN_RUN_DIR=str(run_dir)))
    try:
        wait_for_steps(run_dir, 1, job_id, slurm)
        slurm.command("scancel", "--signal=USR1", job_id)
        # Requeued, and the node done with the first run (it revokes that run's job credential then).
        slurm.wait_for_job(job_id, lambda job: job["JobState"] == "PENDING" and job["Restarts"] == "1"
                           and slurm.node_state() == "idle", "requeue after the signal")
        # Slurm holds a requeued job about two minutes (BeginTime); the test does not wait that out,
        # only for the next second: the first run's credential is revoked in whole seconds, and a
        # launch in the same second is refused ("Job credential revoked").
        time.sleep(1.05 - time.time() % 1)
        slurm.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        job = slurm.wait_for_end(job_id, "end after the requeue")
    finally:
        reference_log, _ = reference.communicate(timeout=600)
    log = output.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log[-5000:]}\n{slurm.log_tails(40)}"
    assert reference.returncode == 0, reference_log[-5000:]

    stopped = re.search(r"kiln: stopped by (\w+) after step (\d+); checkpoint saved", log)
    assert stopped, log[-5000:]
    assert stopped.group(1) == "SIGUSR1" and int(stopped.group(2)) < STEPS
    assert f"requeueing job {job_id}" in log and f"job {job_id} (restart 1)" in log
    assert f"resumed from {run_dir}/checkpoints/step_{int(stopped.group(2)):06d}" in log, log[-5000:]
    assert "Traceback" not in log, log
    metrics, expected = read_metrics(run_dir), read_metrics(tmp_path / "reference")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # the re-run steps replaced, not repeated
    assert [m["loss"] for m in metrics] == [m["loss"] for m in expected]  # bitwise: the same layout


def test_workers_per_node_follow_the_gpus_the_job_asks_for(slurm_with_gpus, job_env, tmp_path):
    slurm, output = slurm_with_gpus, tmp_path / "job.out"
    # --exclusive (the script's) hands the job both GPUs of the node; it asked for one.
    job_id = slurm.sbatch("--gpus-per-node=1", f"--output={output}", str(SBATCH), TINY, "--dry-run", cwd=REPO,
                          env=dict(slurm.env, **job_env))
    job = slurm.wait_for_end(job_id)
    log = output.read_text()
    assert job["JobState"] == "COMPLETED", f"{job}\n{log}"
    assert job["JOB_GRES"] == "gpu:2" and job["TresPerNode"] == "gres:gpu:1", job
    assert "1 worker(s) per node" in log and "kiln dry run: tiny on 1 ranks" in log, log


def test_rendered_cpu_file_runs_its_workers(slurm, job_env, tmp_path):
    script, output = tmp_path / "tiny.sbatch", tmp_path / "job.out"
    script.write_text(render(TINY, [], gpus_per_node=0, workers_per_node=2, time="10"))
    # Arguments to sbatch replace the rendered run: here a dry run, which starts no processes.
    job_id = slurm.sbatch(f"--output={output}", str(script), TINY, "--dry-run", cwd=tmp_path,
                          env=dict(slurm.env, **job_env))
    job = slurm.wait_for_end(job_id)
    log = output.read_text()
    assert job["JobState"] == "COMPLETED" and job["TresPerNode"] == "gres:gpu:0", f"{job}\n{log}"
    assert "2 worker(s) per node" in log and "kiln dry run: tiny on 2 ranks" in log, log
