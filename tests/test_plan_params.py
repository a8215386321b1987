"""Analytic parameter counts against published numbers and a hand computation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.config import ModelConfig, config_from_dict, load_config
from kiln.parallel.layout import ParallelLayout
from kiln.plan.params import count_parameters, human, human_exact, padded_vocab_size

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LLAMA3_VOCAB = 128256


def _model(name: str, *overrides: str) -> ModelConfig:
    return load_config(CONFIGS / f"{name}.yaml", list(overrides)).model


def test_llama3_8b_matches_published_count() -> None:
    count = count_parameters(_model("llama3-8b"), LLAMA3_VOCAB)
    assert count.total == 8_030_261_248  # Meta-Llama-3-8B, untied
    assert abs(count.total / 8.03e9 - 1) < 0.01
    assert count.embedding == count.output_layer == 128256 * 4096
    assert count.per_layer == 218_112_000


def test_llama3_70b_matches_published_count() -> None:
    count = count_parameters(_model("llama3-70b"), LLAMA3_VOCAB)
    assert count.total == 70_553_706_496
    assert human(count.total) == "70.55B"


def test_llama3_1b_tied_and_125m() -> None:
    tied = count_parameters(_model("llama3-1b"), LLAMA3_VOCAB)
    assert tied.output_layer == 0
    assert tied.total == 1_235_814_400  # Llama-3.2-1B
    assert count_parameters(_model("llama3-125m"), 32000).total == 124_668_672


def test_tiny_by_hand() -> None:
    # hidden 64, 4 heads (head dim 16), 2 kv groups, ffn 256 (Llama rule), vocab 1000 -> padded 1024
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2)
    qkv = 64 * (4 * 16 + 2 * 2 * 16)  # 8192
    proj = 64 * 64  # 4096
    fc1, fc2 = 64 * 2 * 256, 256 * 64  # 32768, 16384
    norms = 2 * 64
    per_layer = qkv + proj + fc1 + fc2 + norms  # 61568
    embedding = 1024 * 64
    count = count_parameters(model, 1000)
    assert count.padded_vocab == 1024
    assert count.per_layer == per_layer == 61568
    assert count.total == 2 * embedding + 2 * per_layer + 64 == 254_272


def test_padded_vocab_follows_megatron() -> None:
    model = ModelConfig()  # make_vocab_divisible_by 128
    assert padded_vocab_size(128256, model, 1) == 128256  # 128 × 1002
    assert padded_vocab_size(128256, model, 2) == 128256  # 256 × 501
    assert padded_vocab_size(128256, model, 4) == 128512  # 512 × 251
    assert padded_vocab_size(128256, model, 8) == 129024
    assert padded_vocab_size(1, model, 1) == 128
    # the padding is counted: 8B at tp 4 holds 2 × 256 extra rows of 4096
    base = count_parameters(_model("llama3-8b"), LLAMA3_VOCAB).total
    assert count_parameters(_model("llama3-8b"), LLAMA3_VOCAB, tp=4).total == base + 2 * 256 * 4096


def _layout(model: dict, parallel: dict, world: int, batch: int = 64) -> tuple[ModelConfig, ParallelLayout]:
    config = config_from_dict(
        {"model": model, "parallel": parallel, "train": {"micro_batch_size": 1, "global_batch_size": batch}}
    )
    return config.model, config.layout(world)


def test_per_stage_untied_pipeline() -> None:
    model, layout = _layout({"num_layers": 4}, {"pp": 2}, 2)
    count = count_parameters(model, 1000)
    stages = count.per_stage(layout)
    assert stages == [count.embedding + 2 * count.per_layer, 2 * count.per_layer + count.final_norm + count.output_layer]
    assert sum(stages) == count.total


def test_per_stage_tied_pipeline_counts_the_copy() -> None:
    model, layout = _layout({"num_layers": 4, "tie_embeddings": True}, {"pp": 2}, 2)
    count = count_parameters(model, 1000)
    stages = count.per_stage(layout)
    assert stages[1] == 2 * count.per_layer + count.final_norm + count.embedding
    assert sum(stages) == count.total + count.embedding
    # one stage: the output layer reads the embedding, no copy
    model, layout = _layout({"num_layers": 4, "tie_embeddings": True}, {}, 1)
    count = count_parameters(model, 1000)
    assert count.per_stage(layout) == [count.total]


def test_per_stage_interleaved_and_per_rank() -> None:
    model, layout = _layout({"num_layers": 8, "num_query_groups": 2}, {"tp": 2, "pp": 2, "virtual_pp": 2}, 4)
    assert layout.stage_layers(8) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    count = count_parameters(model, 1000, tp=2)
    stages = count.per_stage(layout)
    assert stages[0] == count.embedding + 4 * count.per_layer
    assert sum(stages) == count.total
    norms = count.per_layer_norms
    ranks = count.per_rank(layout)
    assert ranks[0] == count.embedding // 2 + 4 * ((count.per_layer - norms) // 2 + norms)
    assert ranks[1] == (count.output_layer + 4 * (count.per_layer - norms)) // 2 + 4 * norms + count.final_norm
    with pytest.raises(ValueError, match="tp=1"):
        count_parameters(model, 1000, tp=1).per_stage(layout)


def test_human_numbers() -> None:
    assert human_exact(8_030_261_248) == "8.03B (8,030,261,248)"
    assert human(124_668_672) == "124.67M"
    assert human_exact(768) == "768"
