"""What every engine feeds the model: a packed token batch split into inputs, labels and positions."""

from __future__ import annotations

import torch


class TokenBatches:
    """``split(batch) → (inputs, labels, positions)``, each [b, s], on the run's device; the model
    returns the loss per token [b, s] on the last pipeline stage (hidden states elsewhere)."""

    def __init__(self, seq_len: int, device: torch.device) -> None:
        self.device = device
        self.positions = torch.arange(seq_len, device=device).unsqueeze(0)  # [1, s]

    def split(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = batch["tokens"].to(self.device, non_blocking=True)  # [b, s+1]
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # [b, s]
        return inputs, labels, self.positions.expand_as(inputs)


def mean_loss(output: torch.Tensor) -> torch.Tensor:
    """The micro-batch loss: mean over its tokens, in fp32."""
    return output.float().mean()
