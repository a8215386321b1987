"""Python garbage collection at fixed steps, on every rank at once (Megatron-LM's --manual-gc).

CPython's automatic collector runs whenever allocation counts cross a threshold, at a different
moment on each rank; a full collection of a trainer's heap takes tens to hundreds of
milliseconds, and every other rank waits for the collecting one at the next collective. With
the automatic collector off and a collection every ``train.gc_every`` steps, the pause is paid
once, by all ranks together.
"""

from __future__ import annotations

import gc

from kiln.trainer.callbacks import Callback


class ScheduledGarbageCollection(Callback):
    def __init__(self, every: int) -> None:
        self.every = every
        self._was_enabled = gc.isenabled()

    def on_train_start(self, trainer) -> None:
        gc.disable()
        gc.collect()  # start from a clean heap: what model building left behind

    def on_step_end(self, trainer, result) -> None:
        if trainer.state.step % self.every == 0:
            gc.collect(1)  # the young generations: the long-lived model and optimizer are not rescanned

    def close(self) -> None:
        if self._was_enabled:
            gc.enable()
