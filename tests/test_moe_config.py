"""model.moe and parallel.ep: what a broken config is told, the expert layout, the routing metrics."""

from __future__ import annotations

import pytest
import torch

from kiln.config import config_from_dict, model_config_from_saved
from kiln.errors import KilnConfigError
from kiln.model.moe import expert_load_metrics, moe_transformer_settings
from kiln.observe.wandb_shipper import wandb_row

MOE = ["model.moe.num_experts=8"]


def _config(*overrides: str):
    return config_from_dict({}, list(overrides))


@pytest.mark.parametrize("overrides,message", [
    (["parallel.ep=2"], "model.moe.num_experts is 0"),
    ([*MOE, "parallel.ep=3"], "not divisible by parallel.ep(3)"),
    ([*MOE, "parallel.engine=deepspeed"], "use parallel.engine=megatron"),
    ([*MOE, "parallel.engine=fsdp"], "use parallel.engine=megatron"),
    ([*MOE, "parallel.tp=2"], "needs parallel.sequence_parallel=true"),
    ([*MOE, "model.moe.expert_bias=true"], "model.moe.score_function=sigmoid"),
    ([*MOE, "model.moe.top_k=9"], "model.moe.top_k(9)"),
    ([*MOE, "parallel.expert_tp=1", "parallel.tp=2", "parallel.sequence_parallel=true"], "with parallel.ep=1"),
    ([*MOE, "kernels.compile=true"], "kernels.compile with model.moe"),
    ([*MOE, "model.moe.expert_ffn_hidden_size=60", "parallel.ep=2", "parallel.expert_tp=8", "parallel.tp=8",
      "parallel.sequence_parallel=true", "model.num_attention_heads=8"], "not divisible by parallel.expert_tp(8)"),
])
def test_broken_moe_configs_name_the_setting(overrides, message):
    with pytest.raises(KilnConfigError) as error:
        _config(*overrides)
    assert message in str(error.value)


def test_layout_rules_for_experts():
    config = _config(*MOE, "parallel.ep=4", "train.global_batch_size=8", "train.micro_batch_size=1")
    with pytest.raises(KilnConfigError, match=r"does not divide the 2 ranks"):
        config.layout(2)
    piped = _config(*MOE, "parallel.ep=2", "parallel.pp=2", "train.global_batch_size=8", "train.micro_batch_size=1")
    with pytest.raises(KilnConfigError, match=r"with parallel.pp\(2\) > 1.*must equal tp\(1\) × cp\(1\)"):
        piped.layout(4)


def test_expert_coordinates_follow_megatron_cores_expert_groups():
    config = _config(*MOE, "parallel.ep=4", "parallel.expert_tp=1", "parallel.tp=2", "parallel.sequence_parallel=true",
                     "train.global_batch_size=32", "train.micro_batch_size=1")
    layout = config.layout(16)
    assert (layout.ep, layout.expert_tp, layout.expert_dp) == (4, 1, 4)
    for axis, coordinate in (("ep", "ep"), ("tp", "expert_tp"), ("dp", "expert_dp")):
        for group in layout.expert_groups(axis):
            assert [layout.expert_coords(rank)[coordinate] for rank in group] == list(range(len(group)))
    assert "ep groups (4 × 4 ranks): [0..3]" in layout.describe()


def test_megatron_settings_of_model_moe():
    config = _config(*MOE, "model.moe.top_k=1", "model.moe.shared_experts=2", "model.moe.expert_ffn_hidden_size=32",
                     "model.moe.capacity_factor=1.5", "model.moe.layer_freq=2", "parallel.ep=2")
    settings = moe_transformer_settings(config.model, config.layout(2), grouped_gemm=False)
    assert settings["num_moe_experts"] == 8 and settings["moe_router_topk"] == 1
    assert settings["moe_router_pre_softmax"]  # a softmax over one chosen expert has no gradient
    assert settings["moe_shared_expert_intermediate_size"] == 64
    assert settings["moe_expert_capacity_factor"] == 1.5 and settings["moe_layer_freq"] == 2
    assert settings["expert_model_parallel_size"] == 2
    off = _config(*MOE, "model.moe.aux_loss_coeff=0")
    assert moe_transformer_settings(off.model, off.layout(1), grouped_gemm=False)["moe_router_load_balancing_type"] == "none"
    assert moe_transformer_settings(_config().model, _config().layout(1), grouped_gemm=False) == {}


def test_saved_model_section_round_trips_with_its_moe_settings():
    config = _config(*MOE, "model.moe.top_k=1")
    saved = config.to_dict()["model"]
    assert model_config_from_saved(saved) == config.model
    assert not model_config_from_saved({k: v for k, v in saved.items() if k != "moe"}).moe.enabled


def test_expert_load_metrics():
    balanced = torch.full((2, 4), 10.0, dtype=torch.float64)
    one_expert = torch.tensor([[0.0, 0.0, 40.0, 0.0]], dtype=torch.float64)
    asked = torch.tensor([40.0, 40.0], dtype=torch.float64)
    metrics = expert_load_metrics(balanced, asked, [0, 1])
    assert metrics["moe_load_cv"] == 0.0 and metrics["moe_load_max_over_mean"] == 1.0
    assert metrics["moe_dropped_fraction"] == 0.0
    collapsed = expert_load_metrics(one_expert, torch.tensor([50.0], dtype=torch.float64), [0])
    assert collapsed["moe_load_max_over_mean"] == 4.0
    assert collapsed["moe_load_cv"] == pytest.approx(3 ** 0.5)
    assert collapsed["moe_dropped_fraction"] == pytest.approx(0.2)  # 10 of 50 token-expert pairs over capacity
    assert set(collapsed) >= {"moe_load_cv_layer_0", "moe_load_max_over_mean_layer_0"}


def test_routing_metrics_go_to_their_own_wandb_section():
    row = wandb_row({"step": 3, "loss": 2.0, "moe_load_cv": 0.4, "moe_load_cv_layer_1": 0.5, "val_loss": 2.1})
    assert row == {"train/loss": 2.0, "moe/load_cv": 0.4, "moe/load_cv_layer_1": 0.5, "val/loss": 2.1}
