"""Live progress lines (``logging.progress``, ``kiln data prepare --progress``): drawn in place on a
terminal, under the log lines; plain log lines when the output is a pipe, a file or a Slurm job's.

The terminal is a pseudo-terminal with a window size, as a user's is; what it shows is read back
from its other end.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from types import SimpleNamespace

import pytest

from kiln.data.tokenizer import bundled_tokenizer_path
from kiln.log import wants_progress_bar
from tests.kiln_run import REPO, TINY, kiln
from tests.test_data_prepare_common import prose


def open_terminal(columns: int = 120, rows: int = 40) -> tuple[int, int]:
    """A pseudo-terminal (controller, terminal end) with a window size, like a user's."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return controller, terminal


def read_all(controller: int) -> str:
    out = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal end closed: everything is read
            break
        if not chunk:
            break
        out += chunk
    os.close(controller)
    return out.decode(errors="replace").replace("\r\n", "\n")  # the terminal's own newline translation


def on_a_terminal(*args: str, timeout: int = 600) -> tuple[int, str]:
    """`kiln ARGS` with stdout and stderr on a terminal; its exit code and what the terminal got."""
    controller, terminal = open_terminal()
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    env.pop("SLURM_JOB_ID", None)
    process = subprocess.Popen([sys.executable, "-m", "kiln", *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                               stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = read_all(controller)
    return process.wait(timeout=timeout), output


def as_seen(output: str) -> list[str]:
    """The lines a terminal ends up showing: each line's text after its last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in output.split("\n")]


# -- when a bar is drawn --------------------------------------------------------------------------
def test_auto_draws_a_bar_on_a_terminal_outside_slurm_only(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    controller, terminal = open_terminal()
    with open(terminal, "w") as on_terminal, open(tmp_path / "log", "w") as to_file:
        assert wants_progress_bar("auto", on_terminal) and not wants_progress_bar("auto", to_file)
        assert wants_progress_bar("bar", to_file) and not wants_progress_bar("plain", on_terminal)
        monkeypatch.setenv("SLURM_JOB_ID", "42")  # srun --pty is a terminal, but the job's log is a file
        assert not wants_progress_bar("auto", on_terminal)
    os.close(controller)


def test_bad_progress_mode_names_the_setting():
    from kiln.config import config_from_dict
    from kiln.errors import KilnConfigError

    with pytest.raises(KilnConfigError, match="logging.progress: 'fancy' is not one of 'auto', 'bar', 'plain'"):
        config_from_dict({}, ["logging.progress=fancy"])


# -- kiln train's line, in-process ----------------------------------------------------------------
def test_log_lines_are_written_above_the_training_bar():
    from kiln.trainer.progress import TrainingProgress

    controller, terminal = open_terminal()
    stream = open(terminal, "w")
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        trainer = SimpleNamespace(state=SimpleNamespace(step=0))
        progress = TrainingProgress(max_steps=3, stream=stream)
        progress.on_train_start(trainer)
        for step in (1, 2, 3):
            trainer.state.step = step
            progress.on_step_end(trainer, None)
            logging.getLogger("kiln").warning(f"a log line after step {step}")
            progress.on_log(trainer, {"loss": 4.25, "tokens_per_s": 12345.0})
        progress.close()
    finally:
        logging.getLogger().removeHandler(handler)
        stream.close()
    seen = [line for line in as_seen(read_all(controller)) if line.strip()]
    assert [line for line in seen if "a log line" in line] == [f"a log line after step {s}" for s in (1, 2, 3)]
    assert seen[-1].startswith("train 3/3 |") and "ETA" in seen[-1] and "loss 4.2500, 12,345 tok/s" in seen[-1]
    assert handler.stream is stream  # the handler writes to its own stream again


# -- kiln data prepare -------------------------------------------------------------------------------
def test_prepare_plain_lines_give_the_share_read_and_an_eta(caplog, monkeypatch):
    from kiln.data.prepare.progress import PrepareProgress

    monkeypatch.setattr(PrepareProgress, "PLAIN_EVERY_S", 0.0)
    progress = PrepareProgress("plain", total_bytes=4_000_000, done_bytes=1_000_000)
    with caplog.at_level(logging.INFO):
        progress.chunk_done(1_000_000, documents=250)
    progress.close()
    assert progress.bar is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("prepare: 50% of 4.00MB read, 250 documents,") and "ETA " in line and "ETA ?" not in line


def test_prepare_draws_a_live_line_on_a_terminal(tmp_path):
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "docs.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": prose(i)}) + "\n")
    (tmp_path / "prep.yaml").write_text("input:\n  chunk_bytes: 8192\npack:\n  seq_len: 32\n")
    args = (str(tmp_path / "in"), "--tokenizer", bundled_tokenizer_path(), "--workers", "1",
            "--config", str(tmp_path / "prep.yaml"))
    code, output = on_a_terminal("data", "prepare", *args, "--out", str(tmp_path / "ds"))
    assert code == 0, output[-3000:]
    updates = [line for line in output.split("\r") if line.startswith("prepare ")]
    # Drawn, then redrawn in place (how often in between depends on the machine's speed), finished.
    assert len(updates) >= 2 and all("ETA" in u for u in updates) and "100%" not in updates[0]
    assert "documents" in updates[-1] and "100%" in updates[-1]
    # On a pipe there is none: test_data_prepare_pipeline.py::test_cli_prepare_stats_and_train_tokenizer.


# -- kiln train through the CLI -----------------------------------------------------------------------
TRAIN = ("train.max_steps=3", "train.log_every=1", "logging.wandb=disabled", "checkpoint.every=0")


@pytest.mark.slow
@pytest.mark.extended  # a whole training run under a pseudo-terminal; the line's rendering is tested above
def test_kiln_train_draws_rank_0s_live_line_on_a_terminal_and_none_on_a_pipe(tmp_path):
    code, output = on_a_terminal("train", TINY, "--nproc-per-node", "2", f"train.run_dir={tmp_path / 'tty'}", *TRAIN)
    assert code == 0, output[-3000:]
    seen = [line for line in as_seen(output) if line.strip()]
    assert sum(line.startswith("train ") for line in seen) == 1  # one bar (rank 0's), redrawn in place
    steps = [line for line in seen if " step " in line and "| loss " in line]
    assert len(steps) == 3 and all(line.startswith("[kiln] ") for line in steps)  # whole lines, above the bar
    assert seen[-1].startswith("train 3/3 |") and "ETA" in seen[-1] and "tok/s" in seen[-1]

    piped = kiln("train", TINY, f"train.run_dir={tmp_path / 'pipe'}", *TRAIN, cache_dir=None)
    assert "\r" not in piped.stdout and "ETA" not in piped.stdout and "step 3 | loss" in piped.stdout
