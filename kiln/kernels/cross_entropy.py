"""The output layer and the vocab-parallel cross-entropy in one pass, a chunk of tokens at a time.

With a 128K vocabulary the logits are the largest activation of a step. megatron-core's path holds
the fp32 softmax of the [tokens, vocab/tp] logits from the loss to its backward, which casts the
gradient to the parameter dtype next to it: 6 bytes a logit in bf16, 8192 tokens × 128256 × 6 ≈
6.3 GB at tp=1 (bench/cross_entropy.py measures it). Here one autograd function runs the output
layer's GEMM and the loss over ``chunk_tokens`` tokens at a time and keeps only each token's
log-sum-exp; backward recomputes a chunk's logits, turns them into the gradient in place and
feeds both GEMMs, so at most one chunk of logits exists at once. The price is one more GEMM over
the vocabulary (the output layer's four instead of three).

The results are megatron-core's: logits in the parameter dtype, the loss in fp32 from them, the
gradient of the logits rounded to the parameter dtype before the two backward GEMMs. With
low-precision weights the weight gradient is accumulated chunk by chunk in the weight's dtype
(one rounding per chunk, where the plain path rounds once) rather than in an fp32 buffer the
size of the weight, which would give back much of the memory saved.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch.autograd.function import once_differentiable

from kiln.parallel.collectives import reduce_tensor_


def output_layer_cross_entropy(output_layer, hidden: torch.Tensor, labels: torch.Tensor, *,
                               weight: torch.Tensor | None = None, chunk_tokens: int) -> torch.Tensor:
    """Loss per token [b, s] in fp32 of megatron-core's vocab-parallel ``output_layer``
    (ColumnParallelLinear, no bias) on ``hidden`` [s, b, h] ([s/tp, b, h] under sequence
    parallelism) against ``labels`` [b, s]; ``weight`` replaces the layer's (tied embeddings).

    Equal, to float rounding, to ``compute_language_model_loss(labels, output_layer(hidden)[0])``.
    """
    if output_layer.bias is not None:
        raise NotImplementedError("output_layer_cross_entropy: the output layer has a bias")
    weight = output_layer.weight if weight is None else weight
    group = output_layer.tp_group
    # The input collectives ColumnParallelLinear would run: each rank's gradient of the hidden
    # states covers its vocabulary slice only, and these sum the slices in backward.
    if output_layer.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, group=group)  # [s, b, h]
    elif group.size() > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    s, b, h = hidden.shape
    vocab_start = weight.size(0) * group.rank()
    loss = _ChunkedCrossEntropy.apply(hidden.reshape(s * b, h), weight, labels.t().reshape(s * b),
                                      vocab_start, chunk_tokens, group)  # [s·b], tokens in [s, b] order
    return loss.view(s, b).t().contiguous()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """hidden [t, h], this rank's weight [v/tp, h], labels [t] → loss [t]; logits never kept."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, chunk_tokens, group):
        tokens = hidden.size(0)
        local_lse = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        target = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        for rows in _chunks(tokens, chunk_tokens):
            logits = _logits(hidden[rows], weight)  # [c, v/tp] fp32
            local, owned = _local_labels(labels[rows], vocab_start, weight.size(0))
            target[rows] = logits.gather(1, local.unsqueeze(1)).squeeze(1).where(owned, 0.0)
            peak = logits.amax(dim=1, keepdim=True)
            local_lse[rows] = peak.squeeze(1) + logits.sub_(peak).exp_().sum(dim=1).log_()
            del logits  # before the next chunk's GEMM allocates
        lse = _vocab_parallel_lse(local_lse, target, group)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.vocab_start, ctx.chunk_tokens = vocab_start, chunk_tokens
        return lse - target

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_loss = grad_loss.float()
        for rows in _chunks(hidden.size(0), ctx.chunk_tokens):
            chunk = hidden[rows]
            grad_logits = _logits(chunk, weight).sub_(lse[rows].unsqueeze(1)).exp_()  # softmax [c, v/tp]
            local, owned = _local_labels(labels[rows], ctx.vocab_start, weight.size(0))
            grad_logits.scatter_add_(1, local.unsqueeze(1), -owned.to(grad_logits.dtype).unsqueeze(1))
            grad_logits = grad_logits.mul_(grad_loss[rows].unsqueeze(1)).to(weight.dtype)
            if needs_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if needs_weight:
                grad_weight.addmm_(grad_logits.t(), chunk)
            del grad_logits
        return grad_hidden, grad_weight, None, None, None, None


def _chunks(tokens: int, chunk_tokens: int):
    for start in range(0, tokens, chunk_tokens):
        yield slice(start, min(start + chunk_tokens, tokens))


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One chunk's logits [c, v/tp], computed in the parameter dtype and read in fp32 (a copy
    only for low-precision weights, so callers may work on it in place)."""
    return (hidden @ weight.t()).float()


def _local_labels(labels: torch.Tensor, vocab_start: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's column in this rank's vocabulary slice (0 where another rank owns it), and
    whether this rank owns it."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < vocab_local)
    return local.where(owned, 0), owned


def _vocab_parallel_lse(local_lse: torch.Tensor, target: torch.Tensor, group) -> torch.Tensor:
    """The log-sum-exp over the whole vocabulary from each rank's over its slice, and the target
    logits summed over ranks in place (only the owner's is non-zero): two collectives per call,
    not per chunk."""
    if group.size() == 1:
        return local_lse
    peak = reduce_tensor_(local_lse.clone(), "max", group)
    summed = reduce_tensor_(torch.stack([(local_lse - peak).exp_(), target]), "sum", group)
    target.copy_(summed[1])
    return peak + summed[0].log_()
