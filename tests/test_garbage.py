"""Scheduled garbage collection: automatic GC off during training, a collection every N steps, restored after."""

from __future__ import annotations

import gc
from types import SimpleNamespace

from kiln.trainer.garbage import ScheduledGarbageCollection


def test_collects_every_n_steps_and_restores_the_automatic_collector(monkeypatch):
    collected: list[tuple] = []
    monkeypatch.setattr(gc, "collect", lambda *generation: collected.append(generation))
    assert gc.isenabled()
    callback = ScheduledGarbageCollection(every=3)
    trainer = SimpleNamespace(state=SimpleNamespace(step=0))
    callback.on_train_start(trainer)
    try:
        assert not gc.isenabled()
        for step in range(1, 8):
            trainer.state.step = step
            callback.on_step_end(trainer, result=None)
    finally:
        callback.close()
    assert gc.isenabled()
    assert collected == [(), (1,), (1,)]  # the clean start, then steps 3 and 6
