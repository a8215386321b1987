"""The MoE routing metrics of a logged step (kiln.model.moe.RoutingRecorder) as a callback."""

from __future__ import annotations

from typing import Any

from kiln.trainer.callbacks import Callback


class RoutingMetrics(Callback):
    """Counts each training step's routing from its start; a logged step's record gets the aux and
    z losses, per-layer expert load (max/mean, coefficient of variation) and the dropped fraction."""

    def __init__(self, moe, num_layers: int) -> None:
        self.moe, self.num_layers = moe, num_layers
        self.recorder = None

    def on_train_start(self, trainer) -> None:
        from kiln.model.moe import RoutingRecorder

        if self.recorder is None:
            self.recorder = RoutingRecorder(trainer.engine.model_parts, self.moe, self.num_layers,
                                            trainer.num_microbatches)

    def on_step_start(self, trainer) -> None:
        self.recorder.start_step()

    def metrics(self, trainer) -> dict[str, Any]:
        return self.recorder.metrics()

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
