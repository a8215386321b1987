"""Weight init: the same seed gives the same weights under any TP size, drawing only the rank's shard."""

from __future__ import annotations

import torch

from tests.distributed import run_distributed

MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=96", "model.vocab_size=256", "train.precision=fp32", "train.device=cpu"]


def _build_and_count(rank: int, tp: int):
    """This rank's initial weights (with their TP split) and how many random numbers it drew."""
    from kiln.config import config_from_dict
    from kiln.model.builder import build_model
    from kiln.parallel.backend import init_parallel

    config = config_from_dict({}, [*MODEL, f"parallel.tp={tp}", "train.global_batch_size=4", "train.micro_batch_size=4"])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    drawn = 0
    real_randn = torch.randn

    def counting_randn(*args, **kwargs):
        nonlocal drawn
        out = real_randn(*args, **kwargs)
        drawn += out.numel()
        return out

    torch.randn = counting_randn
    try:
        (model,) = build_model(config.model, config.parallel, config.train, ctx, vocab_size=256)
    finally:
        torch.randn = real_randn
    weights = {}
    for name, param in model.named_parameters():
        split = getattr(param, "tensor_model_parallel", False) and tp > 1
        stride = 2 if name.endswith("linear_fc1.weight") else 1
        # numpy, not tensors: torch shares tensors between processes through handles that die with the worker
        weights[name] = (param.detach().numpy().copy(), param.partition_dim if split else None, stride)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    return weights, drawn, matrices


def _unshard(shards: list[tuple[torch.Tensor, int | None, int]]) -> torch.Tensor:
    """The full weight from each TP rank's piece (strided weights are [block; block] per rank)."""
    first, dim, stride = shards[0]
    if dim is None:
        return torch.from_numpy(first)
    blocks = [torch.chunk(torch.from_numpy(piece), stride, dim=dim) for piece, _, _ in shards]
    return torch.cat([block[b] for b in range(stride) for block in blocks], dim=dim)


def test_tp2_shards_are_slices_of_the_tp1_weights_and_each_rank_draws_only_its_shard():
    (single, single_drawn, single_matrices), = run_distributed(_build_and_count, 1, 1)
    ranks = run_distributed(_build_and_count, 2, 2)
    assert single_drawn == single_matrices  # every matrix element drawn once, nothing more
    for name, (full, _, _) in single.items():
        rebuilt = _unshard([weights[name] for weights, _, _ in ranks])
        assert torch.equal(rebuilt, torch.from_numpy(full)), f"{name}: the TP=2 shards differ from the TP=1 weight"
    for weights, drawn, matrices in ranks:
        assert drawn == matrices < single_matrices  # a rank draws its own shard, not the full tensors
    # Weights are not all alike (a broken seed would give every slice the same numbers).
    qkv = torch.from_numpy(single["decoder.layers.0.self_attention.linear_qkv.weight"][0])
    assert not torch.equal(qkv[0], qkv[1]) and qkv.std() > 0.01
