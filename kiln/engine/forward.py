"""The one forward pass every engine runs: a packed token batch → per-token next-token losses."""

from __future__ import annotations

import torch


class TokenLossForward:
    """``(model, batch) → output``: the loss per token [b, s] on the last pipeline stage,
    the hidden states sent to the next stage elsewhere."""

    def __init__(self, seq_len: int, device: torch.device) -> None:
        self.device = device
        self.positions = torch.arange(seq_len, device=device).unsqueeze(0)  # [1, s]

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device, non_blocking=True)  # [b, s+1]
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # [b, s]
        return model(inputs, self.positions.expand_as(inputs), attention_mask=None, labels=labels)


def mean_loss(output: torch.Tensor) -> torch.Tensor:
    """The micro-batch loss: mean over its tokens, in fp32."""
    return output.float().mean()
