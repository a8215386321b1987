"""Planning an MoE model: the dry run's and the planner's total and active parameters against a hand
count from the architecture, per-rank counts under expert parallelism, FLOPs per token from active
parameters, the planner's JSON, and the mixtral-small preset's layouts fitting an H100."""

from __future__ import annotations

import json

import pytest

from kiln.cli import main
from kiln.config import ModelConfig, load_config
from kiln.errors import KilnConfigError
from kiln.plan.flops import flops_per_token
from kiln.plan.hardware import accelerator
from kiln.plan.memory import GB, estimate_memory
from kiln.plan.params import count_parameters, human
from kiln.plan.planner import check_memory, make_plan, search_layouts, with_overrides
from tests.test_configs import TABLE

H100 = accelerator("h100")
PRESET = "configs/mixtral-small.yaml"

# mixtral-small's architecture, written out: the counts below are derived from these numbers alone.
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 16, 1024, 16, 4, 64
EXPERTS, TOP_K, EXPERT_FFN, VOCAB = 8, 2, 3584, 128256  # 128256 = 128 × 1002: no padding at tp 1 or 2

EMBEDDING = VOCAB * HIDDEN  # and as much again for the untied output layer
QKV = HIDDEN * (HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM)
ATTENTION_OUT = HEADS * HEAD_DIM * HIDDEN
NORMS = 2 * HIDDEN  # per layer: before attention and before the MoE
ROUTER = EXPERTS * HIDDEN
EXPERT = 3 * HIDDEN * EXPERT_FFN  # SwiGLU: gate and up (h → f each), down (f → h)
TOTAL = 2 * EMBEDDING + LAYERS * (QKV + ATTENTION_OUT + NORMS + ROUTER + EXPERTS * EXPERT) + HIDDEN
ACTIVE = TOTAL - LAYERS * (EXPERTS - TOP_K) * EXPERT


def test_the_hand_count_is_the_preset_described():
    m = load_config(PRESET).model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.query_groups, m.head_dim) == (
        LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM)
    assert (m.moe.num_experts, m.moe.top_k, m.expert_ffn_size, m.vocab_size) == (EXPERTS, TOP_K, EXPERT_FFN, VOCAB)
    assert (m.tie_embeddings, m.moe.shared_experts, m.moe.moe_layers(LAYERS)) == (False, 0, list(range(LAYERS)))
    assert (TOTAL, ACTIVE) == (1_714_062_336, 657_097_728)


def test_dry_run_prints_total_and_active_parameters():
    report = load_config(PRESET).dry_run_report(8)
    assert f"total 1.71B ({TOTAL:,})" in report
    assert f"active per token 657.10M ({ACTIVE:,}): top-2 of 8 experts in 16 MoE layers" in report
    assert "MoE in all 16 layers: 8 experts of ffn 3584, top-2 (softmax router), no shared experts" in report
    assert "MoE dispatch alltoall, dropless" in report
    per_moe_layer = QKV + ATTENTION_OUT + NORMS + ROUTER + EXPERTS * EXPERT
    assert f"per MoE layer {per_moe_layer / 1e6:.2f}M (8 experts × {EXPERT / 1e6:.2f}M" in report
    assert "experts: each stage's 8 ranks = expert_dp 1 × ep 8 × expert_tp 1" in report


def test_dry_run_shows_dense_and_moe_layer_sizes():
    config = load_config(PRESET, ["model.moe.layer_freq=2"])
    report = config.dry_run_report(8)
    dense_layer = QKV + ATTENTION_OUT + NORMS + 3 * HIDDEN * config.model.ffn_size
    assert f"per dense layer {dense_layer / 1e6:.2f}M, per MoE layer" in report
    assert "MoE in 8 of 16 layers (layer_freq 2: 0, 2, 4, …), the others dense" in report
    assert "top-2 of 8 experts in 8 MoE layers" in report


@pytest.mark.parametrize("gpus, overrides, tp, expert_split", [
    (8, [], 1, 8),  # ep 8
    (64, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.expert_tp=1"], 2, 8),  # ep 8, expert_tp 1
    (64, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=4"], 2, 8),  # ep 4 × expert_tp 2
    (8, ["parallel.ep=1"], 1, 1),  # every rank holds every expert
])
def test_per_rank_count_divides_the_experts_over_ep_and_expert_tp(gpus, overrides, tp, expert_split):
    config = load_config(PRESET, overrides)
    layout = config.layout(gpus)
    experts = LAYERS * EXPERTS * EXPERT // expert_split
    # tp shards the embedding, output layer and attention; norms and routers are on every rank whole
    per_rank = (2 * EMBEDDING + LAYERS * (QKV + ATTENTION_OUT)) // tp + LAYERS * (NORMS + ROUTER) + HIDDEN + experts
    count = count_parameters(config.model, VOCAB, tp=tp)
    assert count.per_rank(layout) == [per_rank]
    assert count.experts_per_rank(layout) == [experts]
    assert f"per rank {human(per_rank)} (routed experts {human(experts)})" in config.dry_run_report(gpus)


def test_expert_optimizer_state_is_sharded_over_expert_dp():
    config = load_config(PRESET)  # 8 GPUs, ep 8: expert_dp 1, every rank's expert state is its own
    layout = config.layout(8)
    experts = LAYERS * EXPERTS * EXPERT // 8
    dense = TOTAL - LAYERS * EXPERTS * EXPERT
    adam = 12  # fp32 master, momentum, variance
    optimizer = estimate_memory(config, layout, VOCAB).items["optimizer"]
    assert optimizer == int(adam * (dense / 8 + experts))  # dense state over dp 8, experts' over expert_dp 1
    wide = load_config(PRESET).layout(64)  # ep 8 on 64: expert_dp 8
    assert estimate_memory(config, wide, VOCAB).items["optimizer"] == int(adam * (dense / 64 + experts / 8))


def test_flops_per_token_count_active_parameters():
    moe = load_config(PRESET).model
    # the same model, dense, with one MLP as wide as a token's top_k experts together
    dense = ModelConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=KV_HEADS,
                        ffn_hidden_size=TOP_K * EXPERT_FFN, seq_len=moe.seq_len, vocab_size=VOCAB)
    router = 6.0 * LAYERS * ROUTER  # the one matmul the dense model lacks
    assert flops_per_token(moe, VOCAB) == flops_per_token(dense, VOCAB) + router
    # by hand: 6 per matmul weight a token meets (attention, top_k experts, router, output layer)
    # plus the attention scores, 12·L·h·s
    matmuls = LAYERS * (QKV + ATTENTION_OUT + TOP_K * EXPERT + ROUTER) + VOCAB * HIDDEN
    assert flops_per_token(moe, VOCAB) == 6.0 * matmuls + 12.0 * LAYERS * HIDDEN * moe.seq_len
    # = 6 × (active parameters less embedding and norms) + attention scores
    assert matmuls == ACTIVE - EMBEDDING - LAYERS * NORMS - HIDDEN


def test_plan_json_has_total_and_active_parameters(capsys):
    assert main(["plan", PRESET, "--gpus", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    params, layout, moe = report["parameters"], report["layout"], report["moe"]
    assert (params["total"], params["active"]) == (TOTAL, ACTIVE)
    assert params["experts_per_rank"] == [LAYERS * EXPERTS * EXPERT // 8]
    assert (layout["ep"], layout["expert_tp"], layout["expert_dp"]) == (8, 1, 1)
    assert moe == {"num_experts": 8, "top_k": 2, "shared_experts": 0, "expert_ffn_size": 3584,
                   "moe_layers": list(range(16)), "routing": "top-2 of 8 experts in 16 MoE layers"}
    throughput, scaling = report["throughput"], report["scaling"]
    assert throughput["flops_per_token"] == flops_per_token(load_config(PRESET).model, VOCAB)
    assert throughput["breakdown_s"]["ep_comm"] > 0
    # the dense compute-optimal fits see the active parameters, and the report says the total
    assert (scaling["parameters"], scaling["moe_total_parameters"]) == (ACTIVE, TOTAL)
    assert scaling["training_flops"] == pytest.approx(6.0 * ACTIVE * scaling["tokens"])

    assert main(["plan", PRESET, "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    assert "parameters 1.71B total (non-embedding 1.45B), 657.10M active per token: top-2 of 8 experts" in text
    assert "MoE: N is the 657.10M active parameters per token (of 1.71B)" in text
    assert "ep=8 expert_tp=1 expert_dp=1" in text


def test_plan_json_of_a_dense_model():
    from kiln.plan.cli import plan_json
    from kiln.plan.planner import scaling_for

    config = load_config("configs/llama3-1b.yaml")
    report = plan_json(make_plan(config, 8, VOCAB, H100), H100, 8, scaling_for(config, VOCAB, None), None)
    assert report["moe"] is None and report["scaling"]["moe_total_parameters"] is None
    assert report["parameters"]["active"] == report["parameters"]["total"] == 1_235_814_400
    assert report["throughput"]["breakdown_s"]["ep_comm"] == 0


PRESET_ROWS = [(gpus, overrides) for config, gpus, overrides, *_ in TABLE if config == "mixtral-small.yaml"]


def test_the_readme_lists_the_8_and_64_gpu_layouts():
    assert {gpus for gpus, _ in PRESET_ROWS} >= {8, 64}


@pytest.mark.parametrize("gpus, overrides", PRESET_ROWS, ids=lambda v: str(v))
def test_preset_layouts_fit_an_h100(gpus, overrides):
    config = load_config(PRESET, overrides)
    config.dry_run_report(gpus)  # validates the layout as a launch would
    plan = make_plan(config, gpus, VOCAB, H100)
    assert plan.layout.ep == 8
    assert plan.memory.fits and plan.memory.total < 80 * GB
    assert plan.throughput.mfu > 0.3


def test_search_tries_every_ep_dividing_the_experts():
    # two layers and 4K tokens keep the search small (no pp > 2, no cp)
    config = load_config(PRESET, ["model.num_layers=2", "model.seq_len=4096"])
    plans = search_layouts(config, 8, VOCAB, H100)
    assert {plan.layout.ep for plan in plans} == {1, 2, 4, 8}
    assert {plan.layout.expert_tp for plan in plans if plan.layout.tp == 2} == {1, 2}
    assert all(plan.config.parallel.engine == "megatron" for plan in plans)  # the only engine with MoE


def test_memory_check_offers_a_larger_ep():
    # 64 experts on every rank do not fit; tp (one key/value head), pp (15 layers) and recomputation cannot
    # help enough: only splitting the experts does
    config = load_config(PRESET, ["model.moe.num_experts=64", "model.num_query_groups=1", "model.num_layers=15",
                                  "parallel.ep=1"])
    with pytest.raises(KilnConfigError) as err:
        check_memory(config, 8, VOCAB, H100, "cuda", H100.memory_bytes, "of H100 memory")
    fix = str(err.value).split("the cheapest change that fits is ")[1].split(" (predicted")[0]
    assert fix.startswith("parallel.ep=")
    fixed = with_overrides(config, dict(item.split("=") for item in fix.split()))
    assert make_plan(fixed, 8, VOCAB, H100).memory.fits
