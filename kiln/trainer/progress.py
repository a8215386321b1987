"""The live progress line of ``kiln train``, on rank 0's terminal (``logging.progress``).

``train 120/300 |####      | 40% ETA 02:10 (01:27 so far, 1.38step/s, loss 3.2145, 45,210 tok/s)``

The step count, rate and ETA move every step (the ETA from the measured step rate, smoothed);
loss and tokens/s are the last logged step's (a step's global loss is a collective, which rank 0
alone must not start). The console logger's lines keep coming, written above the line.
"""

from __future__ import annotations

import sys
from typing import Any

from kiln.log import progress_bar, wants_progress_bar, write_logs_above_the_bar
from kiln.trainer.callbacks import Callback


class TrainingProgress(Callback):
    """Rank 0's progress bar on ``stream``; the console log handlers on it write above the bar."""

    def __init__(self, max_steps: int, stream=None) -> None:
        self.max_steps, self.stream = max_steps, stream or sys.stdout
        self.bar = None
        self._restore_logs = lambda: None

    def on_train_start(self, trainer) -> None:
        self.bar = progress_bar(total=self.max_steps, initial=trainer.state.step, desc="train", unit="step",
                                stream=self.stream)
        self._restore_logs = write_logs_above_the_bar(self.stream)

    def on_step_end(self, trainer, result) -> None:
        self.bar.update(trainer.state.step - self.bar.n)  # a rollback moves it back

    def on_log(self, trainer, m: dict[str, Any]) -> None:
        self.bar.set_postfix_str(f"loss {m['loss']:.4f}, {m['tokens_per_s']:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        self._restore_logs()
        if self.bar is not None:
            self.bar.close()


def progress_callbacks(mode: str, *, rank: int, max_steps: int) -> list[Callback]:
    """``logging.progress``: the bar on rank 0 when wanted (see :func:`kiln.log.wants_progress_bar`)."""
    return [TrainingProgress(max_steps)] if rank == 0 and wants_progress_bar(mode, sys.stdout) else []
