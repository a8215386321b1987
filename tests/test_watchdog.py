"""The hang watchdog (kiln.trainer.watchdog): a rank made to sleep inside a step, on 2 gloo ranks
below the CLI; what it writes and what it leaves alone, in-process; and a worker stopped under
`kiln train --nproc-per-node 2`, whose launcher must exit 124 where torchrun says 1."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kiln.config import config_from_dict
from kiln.trainer import watchdog
from kiln.trainer.watchdog import EXIT_HUNG, HUNG_MARKER, HangWatchdog
from tests.distributed import exit_codes_of_ranks
from tests.kiln_run import TINY, read_metrics, start_kiln, worker_pid

# Steps of the tiny model take milliseconds; the allowances are far above them, so only the
# planted sleep (or stop) can overrun one.
ALLOWANCES = ("watchdog.timeout_s=10", "watchdog.between_steps_timeout_s=10", "watchdog.first_step_timeout_s=300")
# Rank 0 waits for the sleeper between steps, where its own deadline is far: only the sleeper's
# alarm can make it dump in time.
ONLY_STEPS_SHORT = ("watchdog.timeout_s=5", "watchdog.between_steps_timeout_s=600",
                    "watchdog.first_step_timeout_s=300")


def sleep_inside_the_step() -> None:
    time.sleep(600)  # far beyond the allowance: the watchdog must end the process first


def _train_with_rank_1_asleep_in_step_2(rank: int, run_dir: Path) -> None:
    from kiln.parallel.backend import init_parallel
    from kiln.train import build_run_engine
    from kiln.trainer.callbacks import Callback
    from kiln.trainer.loop import Trainer

    config = config_from_dict({}, ["model.vocab_size=256", "train.precision=fp32", "train.device=cpu",
                                   "train.max_steps=4", "train.log_every=1", "train.micro_batch_size=2",
                                   "train.global_batch_size=4", "logging.wandb=disabled", *ONLY_STEPS_SHORT])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    generator = torch.Generator().manual_seed(ctx.rank)
    batches = iter([{"tokens": torch.randint(0, 256, (2, config.model.seq_len + 1), generator=generator)}
                    for _ in range(8)])

    class SleepOnRank1InStep2(Callback):
        def skip_update(self, trainer, result):
            if rank == 1 and trainer.state.step == 1:  # the gradients of step 2 are ready
                sleep_inside_the_step()
            return False

    trainer = Trainer(train=config.train, data=config.data, seq_len=config.model.seq_len, ctx=ctx,
                      engine=build_run_engine(config, ctx, 256), batches=batches,
                      callbacks=[HangWatchdog(config.watchdog, rank=rank, run_dir=run_dir, device_type="cpu"),
                                 SleepOnRank1InStep2()])
    try:
        trainer.train()  # rank 0 waits for rank 1 in the collective after step 2; neither returns
    finally:
        trainer.close()  # as kiln.train.run does


def test_a_rank_asleep_inside_a_step_dumps_every_ranks_stacks_and_exits_124(tmp_path):
    run_dir = tmp_path / "run"
    codes = exit_codes_of_ranks(_train_with_rank_1_asleep_in_step_2, 2, run_dir, timeout_s=240)
    assert codes == [EXIT_HUNG, EXIT_HUNG]
    asleep, waiting = (run_dir / "logs" / "stacks-rank1.txt").read_text(), (run_dir / "logs" / "stacks-rank0.txt").read_text()
    assert "rank 1" in asleep and "step 2 took longer than 5s" in asleep and "in sleep_inside_the_step" in asleep
    # Rank 0 finished step 2 and waits in the collective of its log line: rank 1's alarm made it dump
    # its own stack (its deadline was minutes away).
    assert "rank 0" in waiting and "rank 1's step 2 took longer than 5s" in waiting and "in train" in waiting
    assert "sleep_inside_the_step" not in waiting
    assert json.loads((run_dir / HUNG_MARKER).read_text())["rank"] in (0, 1)


# -- in-process: what a firing writes, and a run that does not hang -----------------------------
class _FakeTrainer:
    def __init__(self) -> None:
        self.state = SimpleNamespace(step=0)


def _watchdog(tmp_path: Path, device_type: str = "cpu", rank: int = 3) -> HangWatchdog:
    config = config_from_dict({}, list(ALLOWANCES)).watchdog
    return HangWatchdog(config, rank=rank, run_dir=tmp_path, device_type=device_type)


def test_steps_within_their_allowance_leave_no_dump_and_clear_an_old_marker(tmp_path):
    (tmp_path / HUNG_MARKER).write_text("{}")  # an earlier attempt's
    trainer, dog = _FakeTrainer(), _watchdog(tmp_path, rank=0)
    dog.on_train_start(trainer)
    assert (tmp_path / "logs" / "stacks-rank0.txt").exists()  # open from the start, for faulthandler's thread
    for _ in range(3):
        dog.on_step_start(trainer)
        trainer.state.step += 1
        dog.on_step_end(trainer, None)
    dog.close()
    assert not (tmp_path / HUNG_MARKER).exists()
    assert not (tmp_path / "logs" / "stacks-rank0.txt").exists()  # no empty dump left behind


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_a_firing_writes_stacks_marker_and_on_gpus_only_the_flight_recorder(tmp_path, monkeypatch, device_type):
    import torch._C._distributed_c10d as c10d

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    dumps = []
    monkeypatch.setattr(c10d, "_dump_nccl_trace", lambda **kw: dumps.append(kw) or b"flight recorder pickle",
                        raising=False)
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setenv("KILN_LAUNCH_ID", "launch-7")
    dog = _watchdog(tmp_path, device_type)
    dog.on_train_start(_FakeTrainer())
    try:
        with pytest.raises(Exited) as exited:
            dog._overran("step 5", 10.0)  # in the main thread here, in the watchdog's thread in a run
    finally:  # what os._exit would have ended (close() waits for that exit)
        faulthandler.cancel_dump_traceback_later()
        dog._deadline.close()
        dog._stack_file.close()
    assert exited.value.args == (EXIT_HUNG,)
    stacks = (tmp_path / "logs" / "stacks-rank3.txt").read_text()
    assert "rank 3" in stacks and "step 5 took longer than 10s" in stacks
    assert "in test_a_firing_writes_stacks_marker" in stacks  # this thread's stack: every thread is dumped
    marker = json.loads((tmp_path / HUNG_MARKER).read_text())
    assert marker["launch_id"] == "launch-7" and marker["rank"] == 3
    trace = tmp_path / "logs" / "nccl-trace-rank3"
    if device_type == "cuda":
        assert trace.read_bytes() == b"flight recorder pickle" and dumps
    else:
        assert not trace.exists() and not dumps  # a CPU run never touches NCCL


def test_flight_recorder_is_written_beside_the_stacks_unless_the_user_chose(tmp_path, monkeypatch):
    for name in ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                 "TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        monkeypatch.delenv(name, raising=False)
    env = watchdog.flight_recorder_environment(str(tmp_path))
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{tmp_path}/logs/nccl-trace-rank"
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] != "0" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    monkeypatch.setenv("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "/scratch/fr-")  # the user's, under the older name
    env = watchdog.flight_recorder_environment(str(tmp_path))
    assert "TORCH_FR_DUMP_TEMP_FILE" not in env and "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in env


def test_bad_allowance_names_the_setting():
    from kiln.errors import KilnConfigError

    with pytest.raises(KilnConfigError, match=r"watchdog.timeout_s must be >= 0 seconds \(0: unwatched\), got -1"):
        config_from_dict({}, ["watchdog.timeout_s=-1"])


# -- through the CLI: the launcher tells a hang from a failure ----------------------------------
def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # reaped later
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.extended  # `make test` has the hang itself (2 ranks below the CLI); this is the launcher's code
def test_launcher_exits_124_when_a_stopped_worker_hangs_the_run(tmp_path):
    """SIGSTOP freezes rank 1 as a stuck driver call would: rank 0 waits in a collective, its
    watchdog dumps and exits 124, torchrun reports 1, and the launcher reads the marker."""
    run_dir = tmp_path / "run"
    launcher = start_kiln("train", TINY, "--nproc-per-node", "2", f"train.run_dir={run_dir}", "train.max_steps=100000",
                          "train.log_every=1", "logging.wandb=disabled", "checkpoint.every=0", *ALLOWANCES,
                          cache_dir=tmp_path / "cache")
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()[-5000:]
        time.sleep(0.05)
    waiting, stopped = worker_pid(launcher.pid, rank=0), worker_pid(launcher.pid, rank=1)
    os.kill(stopped, signal.SIGSTOP)
    try:
        while not _exited(waiting):
            assert time.monotonic() < deadline + 120, "rank 0's watchdog never ended it"
            time.sleep(0.1)
        # What the stop did to rank 0 is done; torchrun would wait 30 s to kill a stopped worker.
        os.kill(stopped, signal.SIGCONT)
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.kill(stopped, signal.SIGKILL)
            launcher.kill()
    assert launcher.returncode == EXIT_HUNG, output[-5000:]
    assert "kiln: rank 0: step" in output and "took longer than 10s: hung; stacks in" in output
    assert "in train" in (run_dir / "logs" / "stacks-rank0.txt").read_text()
    assert json.loads((run_dir / HUNG_MARKER).read_text())["launch_id"]  # the launcher's, checked by it
