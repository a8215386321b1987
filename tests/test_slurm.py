"""slurm/kiln.sbatch under a stand-in Slurm (srun and scontrol on PATH): the real `kiln train`
runs through the multi-node path (c10d rendezvous), and an exit code of 75 requeues the job."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
import textwrap

from kiln.parallel.backend import free_port
from tests.kiln_run import REPO, TINY, read_metrics

pytestmark = pytest.mark.slow  # trains through the CLI (torchrun, gloo)

SBATCH = REPO / "slurm" / "kiln.sbatch"


def _fake_slurm(bin_dir, log):
    bin_dir.mkdir()
    # srun: drop its own options, run the task once (one node).
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/bin/bash
        while [[ "$1" == --* ]]; do shift; done
        exec "$@"
        """))
    (bin_dir / "scontrol").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "scontrol $*" >> {log}
        if [ "$1" = show ]; then echo localhost; fi
        """))
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)


def _run_sbatch(tmp_path, kiln_command, *args):
    log = tmp_path / "scontrol.log"
    _fake_slurm(tmp_path / "bin", log)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="kiln-test", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
               KILN_GPUS_PER_NODE="2", KILN_RUN_DIR=str(tmp_path / "run"), KILN=str(kiln_command),
               KILN_RDZV_PORT=str(free_port()), OMP_NUM_THREADS="1", KILN_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run(["bash", str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    return result, (log.read_text() if log.exists() else "")


def _executable(path, body):
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def test_sbatch_trains_through_c10d_rendezvous(tmp_path):
    kiln = _executable(tmp_path / "kiln", f'exec {sys.executable} -m kiln "$@"\n')
    result, scontrol = _run_sbatch(tmp_path, kiln, TINY, "train.max_steps=4", "train.log_every=2",
                                   "logging.wandb=disabled", "checkpoint.every=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [2, 4]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert "requeue" not in scontrol


def test_sbatch_requeues_when_kiln_stopped_for_preemption(tmp_path):
    kiln = _executable(tmp_path / "kiln", 'echo "kiln $*"; exit 75\n')
    result, scontrol = _run_sbatch(tmp_path, kiln, TINY)
    assert result.returncode == 75
    assert "--max-restarts 3" in result.stdout and "--rdzv-id 4242" in result.stdout
    assert "scontrol requeue 4242" in scontrol
