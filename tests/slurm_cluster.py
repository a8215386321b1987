"""A real single-node Slurm cluster for the tests: Debian's munge, slurmctld and slurmd.

Each cluster lives in a directory of its own, with its own munge key and socket, ports, state
and spool: it neither needs nor disturbs a Slurm already on the machine (another test run's
cluster, or a real one). Commands reach it through ``SLURM_CONF`` (see :attr:`SlurmCluster.env`),
and jobs inherit that from sbatch. Where the cluster cannot be had (not root, no apt-get, the
install or the daemons fail), :class:`SlurmUnavailable` says why and the tests skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from kiln.parallel.backend import free_port

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun")
POLL_S = 0.1


class SlurmUnavailable(Exception):
    """This machine cannot run the test cluster; the message says why (the skip reason)."""


def ensure_installed() -> None:
    """Install the Slurm and munge packages with apt-get unless their commands are all here."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd and munged needs root")
    if all(shutil.which(command) for command in COMMANDS):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"Slurm is not installed and there is no apt-get to install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *PACKAGES]
    result = None
    for commands in ([install], [["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], install]):
        for command in commands:  # first from the package lists at hand, then from fresh ones
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                break
        if result.returncode == 0 and all(shutil.which(command) for command in COMMANDS):
            return
    missing = [command for command in COMMANDS if not shutil.which(command)]
    raise SlurmUnavailable(f"after apt-get install {' '.join(PACKAGES)} (exit {result.returncode}), still not on PATH: "
                           f"{' '.join(missing)}\n{(result.stdout + result.stderr)[-1500:]}")


class SlurmCluster:
    """munged, slurmctld and slurmd for one node (this machine) and one partition, ``debug``."""

    def __init__(self, gpus: int = 0) -> None:
        # A short path: munge's socket lives here, and a socket path has at most 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="kiln-slurm-", dir="/tmp"))
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.gpus = gpus
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> None:
        self._start_munge()
        self.conf.write_text(self._config())
        if self.gpus:
            # Slurm counts a node's GPUs by their device files; empty files stand in (nothing opens them).
            for index in range(self.gpus):
                (self.root / f"gpu{index}").touch()
            (self.root / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File={self.root}/gpu[0-{self.gpus - 1}]\n")
        self._daemon("slurmctld", "-f", str(self.conf))
        self._daemon("slurmd", "-f", str(self.conf), "-N", self.node)
        deadline = time.monotonic() + 60
        while self.node_state() != "idle":
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"node {self.node} did not become idle (state {self.node_state()!r}):\n"
                                       + self.log_tails())
            time.sleep(POLL_S)

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self.socket = self.root / "munge.socket"
        self._daemon("munged", "--force", f"--socket={self.socket}", f"--key-file={key}",
                     f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
                     f"--seed-file={self.root / 'munged.seed'}")
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged did not open its socket:\n" + self.log_tails())
            time.sleep(POLL_S)

    def _config(self) -> str:
        cpus = len(os.sched_getaffinity(0))
        memory_mb = _memory_mb() * 9 // 10  # what slurmd finds, less a margin, or it drains the node
        spool = self.root / "spool"
        spool.mkdir()
        return "\n".join([
            "ClusterName=kiln-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            # The node is what this file says, even inside a container that shows the host's hardware.
            "SlurmdParameters=config_overrides",
            # Short timeouts: a test waits on each of them.
            "SlurmctldTimeout=10",
            "SlurmdTimeout=10",
            "MessageTimeout=5",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job`
            *(["GresTypes=gpu"] if self.gpus else []),
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN"
            + (f" Gres=gpu:{self.gpus}" if self.gpus else ""),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"

    def _daemon(self, *command: str) -> None:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{command[0]} did not start: {result.stdout}{result.stderr}\n" + self.log_tails())

    def log_tails(self, lines: int = 10) -> str:
        tails = []
        for log in sorted(self.root.glob("*.log")):
            tails.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons this cluster started (by their pids), remove its files."""
        pids = {name: _read_pid(self.root / f"{name}.pid") for name in ("slurmd", "slurmctld", "munged")}
        if pids["slurmctld"] is not None:
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for name, pid in pids.items():
            if pid is not None:
                _stop_process(pid, name, grace_s=0 if name == "munged" else 10)  # munged is not Slurm's to stop
        shutil.rmtree(self.root, ignore_errors=True)

    # --- commands ---

    def command(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def node_state(self) -> str:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True,
                                timeout=30)
        return result.stdout.strip()

    def sbatch(self, *args: str, **kwargs) -> str:
        """Submit; returns the job id."""
        return self.command("sbatch", "--parsable", *args, **kwargs).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        line = self.command("scontrol", "show", "job", "--details", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_for_job(self, job_id: str, done, what: str, timeout_s: float = 600) -> dict[str, str]:
        """Poll the job until ``done(job)``; fails naming ``what`` it waited for and the job's state."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if done(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: no {what} within {timeout_s:.0f}s; state {job.get('JobState')}, "
                                     f"reason {job.get('Reason')}\n{self.log_tails()}")
            time.sleep(POLL_S)


    def wait_for_end(self, job_id: str, what: str = "end") -> dict[str, str]:
        return self.wait_for_job(job_id, lambda job: job["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"), what)


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("no MemTotal in /proc/meminfo")


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_process(pid: int, name: str, grace_s: float) -> None:
    """Give the daemon ``name`` grace_s to exit, then SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_s
        while _running(pid, name) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if not _running(pid, name):
            return
        os.kill(pid, sig)
        grace_s = 10


def _running(pid: int, name: str) -> bool:
    """``pid`` runs and is ``name`` (not a later process that was given the same pid)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return comm == name and state != "Z"
