"""What every engine feeds the model: a packed token batch split into inputs, labels, positions
and document map, cut to this context-parallel rank's share of the sequence."""

from __future__ import annotations

import torch

from kiln.kernels.documents import document_positions
from kiln.kernels.ring_attention import split_for_context_parallel


class TokenBatches:
    """``split(batch) → (inputs, labels, positions, documents)`` on the run's device.

    inputs, labels and positions are [b, s/cp]: this CP rank's two chunks of the sequence (see
    kiln.kernels.ring_attention). ``documents`` is the whole sequence's document map [b, s]
    (attention needs the documents of the keys other ranks hold), or None without document
    masking. The model returns the loss per local token [b, s/cp] on the last pipeline stage
    (hidden states elsewhere).
    """

    def __init__(self, seq_len: int, ctx) -> None:
        self.device = ctx.device
        self.cp_rank, self.cp = ctx.coords["cp"], ctx.layout.cp
        self.positions = self._local(torch.arange(seq_len, device=self.device).unsqueeze(0))  # [1, s/cp]

    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        return split_for_context_parallel(tensor, self.cp_rank, self.cp) if self.cp > 1 else tensor

    def split(self, batch: dict[str, torch.Tensor]):
        tokens = batch["tokens"].to(self.device, non_blocking=True)  # [b, s+1]
        inputs, labels = self._local(tokens[:, :-1]), self._local(tokens[:, 1:])
        documents = batch.get("documents")
        if documents is None:
            return inputs.contiguous(), labels.contiguous(), self.positions.expand_as(inputs), None
        documents = documents.to(self.device, non_blocking=True)
        positions = self._local(document_positions(documents))
        return inputs.contiguous(), labels.contiguous(), positions.contiguous(), documents


def mean_loss(output: torch.Tensor) -> torch.Tensor:
    """The micro-batch loss: mean over its tokens, in fp32."""
    return output.float().mean()
