"""kiln.kernels.cross_entropy: the chunked output layer + loss is megatron-core's plain path.

Each case builds megatron-core's real ColumnParallelLinear on gloo ranks (CPU emulation), runs
the plain path (the layer, then ``vocab_parallel_cross_entropy`` over its logits) and the chunked
one on the same weights, hidden states and labels, and compares the loss and the gradients of
the hidden states and of the weight. One spawn per TP size runs every case of that size.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

VOCAB, HIDDEN, SEQ, BATCH = 96, 16, 12, 2  # 24 tokens
# name: (tp, sequence_parallel, chunk_tokens, dtype, tied)
CASES = {
    "tp1-chunk-divides": (1, False, 8, torch.float32, False),
    "tp1-chunk-does-not-divide": (1, False, 7, torch.float32, False),
    "tp1-one-chunk-larger-than-the-tokens": (1, False, 100, torch.float32, False),
    "tp1-tied-weight": (1, False, 5, torch.float32, True),
    "tp1-bf16": (1, False, 7, torch.bfloat16, False),
    "tp2-chunk-divides": (2, False, 8, torch.float32, False),
    "tp2-chunk-does-not-divide": (2, False, 7, torch.float32, False),
    "tp2-sequence-parallel": (2, True, 8, torch.float32, False),
    "tp2-sequence-parallel-chunk-does-not-divide": (2, True, 5, torch.float32, False),
    "tp2-sequence-parallel-bf16": (2, True, 5, torch.bfloat16, False),
}
# Relative to the largest magnitude of the plain path's tensor. bf16: the logits' and gradients'
# own rounding (the weight gradient is rounded once per chunk, against once in the plain path).
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def _output_layer(tp: int, sequence_parallel: bool, dtype: torch.dtype, vocab: int, hidden: int):
    """megatron-core's vocab-parallel output layer as GPTModel builds it, this rank's slice of a
    weight drawn the same on every rank."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                                 params_dtype=dtype, perform_initialization=False)
    layer = ColumnParallelLinear(hidden, vocab, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                 gather_output=False, skip_bias_add=False)
    full = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(1)) * 0.5
    rank = layer.tp_group.rank()
    with torch.no_grad():
        layer.weight.copy_(full.chunk(tp)[rank])
    return layer


def _inputs(tp: int, sequence_parallel: bool, dtype: torch.dtype, seq: int, vocab: int, hidden: int):
    """This rank's hidden states (its sequence slice under sequence parallelism), the labels and
    the gradient of the loss, the same on every rank."""
    generator = torch.Generator().manual_seed(2)
    states = torch.randn(seq, BATCH, hidden, generator=generator)
    labels = torch.randint(0, vocab, (BATCH, seq), generator=generator)
    grad_loss = torch.rand(BATCH, seq, generator=generator)  # not all ones: backward must scale by it
    if sequence_parallel:
        from megatron.core import parallel_state

        states = states.chunk(tp)[parallel_state.get_tensor_model_parallel_rank()]
    return states.to(dtype), labels, grad_loss


def _plain(layer, states, labels, weight=None):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, _ = layer(states, weight=weight)
    return vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()  # as GPTModel, without fusion


def _chunked(chunk_tokens):
    from kiln.kernels.cross_entropy import output_layer_cross_entropy

    def loss(layer, states, labels, weight=None):
        return output_layer_cross_entropy(layer, states, labels, weight=weight, chunk_tokens=chunk_tokens)

    return loss


def _run(path, layer, states, labels, grad_loss, tied: bool):
    """Loss, gradient of the hidden states and of the weight (a separate parameter when tied)."""
    states = states.clone().requires_grad_()
    weight = torch.nn.Parameter(layer.weight.detach().clone()) if tied else None
    layer.weight.grad = None
    loss = path(layer, states, labels, weight)
    (loss * grad_loss).sum().backward()
    grad_weight = (weight if tied else layer.weight).grad
    return [t.detach().float() for t in (loss, states.grad, grad_weight)]


def _init(tp: int):
    from kiln.parallel.backend import init_parallel
    from kiln.parallel.layout import ParallelLayout

    init_parallel("cpu", 0, lambda world: ParallelLayout(world_size=world, tp=tp, pp=1, cp=1, dp=world // tp))


def _compare_cases(rank: int, tp: int) -> dict[str, list[float]]:
    """Per case of this TP size: the chunked path's error in loss, hidden and weight gradients,
    relative to the plain path's largest magnitude."""
    _init(tp)
    errors = {}
    for name, (case_tp, sequence_parallel, chunk_tokens, dtype, tied) in CASES.items():
        if case_tp != tp:
            continue
        layer = _output_layer(tp, sequence_parallel, dtype, VOCAB, HIDDEN)
        states, labels, grad_loss = _inputs(tp, sequence_parallel, dtype, SEQ, VOCAB, HIDDEN)
        plain = _run(_plain, layer, states, labels, grad_loss, tied)
        chunked = _run(_chunked(chunk_tokens), layer, states, labels, grad_loss, tied)
        assert all(p.shape == c.shape for p, c in zip(plain, chunked)), name
        errors[name] = [float((c - p).abs().max() / p.abs().max()) for p, c in zip(plain, chunked)]
    return errors


@pytest.fixture(scope="module")
def errors():
    """Every case's errors, one spawn per TP size (rank 0's; the other rank asserts its own)."""
    found = {}
    for tp in (1, 2):
        ranks = run_distributed(_compare_cases, tp, tp)
        for name in ranks[0]:
            found[name] = [max(rank[name][i] for rank in ranks) for i in range(3)]
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_matches_the_plain_path_in_loss_and_gradients(name, errors):
    dtype = CASES[name][3]
    loss, grad_hidden, grad_weight = errors[name]
    tolerance = TOLERANCE[dtype]
    assert loss < tolerance, f"{name}: loss differs by {loss:.2e} (relative)"
    assert grad_hidden < tolerance, f"{name}: gradient of the hidden states differs by {grad_hidden:.2e}"
    assert grad_weight < tolerance, f"{name}: gradient of the weight differs by {grad_weight:.2e}"


# The memory check: enough tokens that [tokens, vocab/tp] dwarfs a chunk's logits and the hidden states.
MEMORY_SEQ, MEMORY_CHUNK = 256, 32


def _largest_tensors(rank: int, tp: int) -> dict[str, int]:
    """Elements of the largest tensor any operation creates in forward + backward, per path."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.elements = max([self.elements, *sizes])
            return out

    _init(tp)
    sequence_parallel = tp > 1
    layer = _output_layer(tp, sequence_parallel, torch.float32, VOCAB, HIDDEN)
    states, labels, grad_loss = _inputs(tp, sequence_parallel, torch.float32, MEMORY_SEQ, VOCAB, HIDDEN)
    largest = {}
    for name, path in (("plain", _plain), ("chunked", _chunked(MEMORY_CHUNK))):
        with LargestTensor() as mode:
            _run(path, layer, states, labels, grad_loss, tied=False)
        largest[name] = mode.elements
    return largest


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_never_builds_the_whole_logits(tp):
    largest = run_distributed(_largest_tensors, tp, tp)[0]
    tokens, vocab_local = MEMORY_SEQ * BATCH, VOCAB // tp
    whole_logits = tokens * vocab_local
    assert largest["plain"] >= whole_logits  # the probe sees the tensor it looks for
    # A chunk's logits, or the [tokens, h] hidden states and their gradient; nothing bigger.
    assert largest["chunked"] <= max(MEMORY_CHUNK * vocab_local, tokens * HIDDEN) < whole_logits, largest
