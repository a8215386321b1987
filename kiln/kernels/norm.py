"""RMSNorm for megatron-core's local layer spec that also works under sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel`` outright. The refusal is
about gradients, not the forward: with sequence parallelism each TP rank normalises its own
slice of the sequence, so each rank's gain gradient is a partial sum. megatron-core's norms
tag their parameters ``sequence_parallel=True`` and ``finalize_model_grads`` sums the tagged
gradients over the TP group; this norm does the same, so the local spec (CPU, or GPUs
without Transformer Engine) runs the 8B and 70B presets' settings unchanged.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from megatron-core's norm arguments."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel
