"""Hugging Face Mixtral ↔ kiln's MoE models: the mapping, the routing, logits parity under expert
parallelism, `kiln ckpt export --hf` of a run trained with EP=2 scored in transformers, `kiln ckpt
import --hf` into EP=2 and back, and what Mixtral cannot hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.config import ModelConfig, MoeConfig
from kiln.errors import KilnConfigError
from kiln.hf import llama, mixtral
from tests.distributed import run_distributed
from tests.test_hf import kiln_here, kiln_logits_of_hf, random_hf_model, read_safetensors

# configs/tiny-moe.yaml's model: tiny.yaml's attention and vocabulary, 8 experts of width 64, top 2.
TINY_MIXTRAL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096,
                    max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5, router_aux_loss_coef=0.01,
                    bos_token_id=0, eos_token_id=0)


def random_mixtral(seed: int = 0, **changes):
    """A small random ``MixtralForCausalLM``."""
    return random_hf_model("Mixtral", {**TINY_MIXTRAL, **changes}, seed)


def shape_of(config) -> mixtral.MixtralShape:
    return mixtral.MixtralShape(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                                config.num_key_value_heads, config.intermediate_size, config.vocab_size,
                                config.tie_word_embeddings, num_experts=config.num_local_experts)


# -- the mapping --------------------------------------------------------------------------------
def test_mapping_round_trips_every_tensor_of_a_transformers_mixtral():
    hf_model = random_mixtral(num_local_experts=4, intermediate_size=32, vocab_size=1000)
    hf = hf_model.state_dict()
    shape = shape_of(hf_model.config)
    llama.check_hf_names(hf, shape)  # the names transformers uses, no more, no fewer
    kiln = llama.hf_to_kiln(hf, shape, padded_vocab=1024)
    assert kiln["decoder.layers.mlp.router.weight"].shape == (2, 4, 64)
    assert kiln["decoder.layers.mlp.experts.experts.linear_fc1.weight"].shape == (2, 4, 2 * 32, 64)
    assert kiln["decoder.layers.mlp.experts.experts.linear_fc2.weight"].shape == (2, 4, 64, 32)
    fc1 = kiln["decoder.layers.mlp.experts.experts.linear_fc1.weight"][1, 3]
    expert = hf_model.model.layers[1].block_sparse_moe.experts[3]
    assert torch.equal(fc1, torch.cat([expert.w1.weight, expert.w3.weight]))  # [gate; up]
    assert "decoder.layers.mlp.linear_fc1.weight" not in kiln  # no dense MLP
    back = llama.kiln_to_hf(kiln, shape)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[name], hf[name]) for name in hf)


def test_one_expert_of_one_layer_is_read_alone():
    """The import's unit: under expert parallelism a rank reads only the experts it holds."""
    hf_model = random_mixtral(num_local_experts=4, intermediate_size=32, vocab_size=1000)
    hf, shape, read = hf_model.state_dict(), shape_of(hf_model.config), []

    def reader(name: str) -> torch.Tensor:
        read.append(name)
        return hf[name]

    name = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
    one = llama.kiln_tensor_from_hf(name, (1, 2), reader, shape, 1024)
    assert torch.equal(one, hf["model.layers.1.block_sparse_moe.experts.2.w2.weight"])
    assert read == ["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    assert llama.kiln_tensor_from_hf(name, (1,), reader, shape, 1024).shape == (4, 64, 32)  # the layer's stack


@pytest.mark.parametrize("top_k", [2, 3])
def test_megatron_routing_is_mixtrals(top_k):
    """megatron-core's softmax over the top-k logits = Mixtral's softmax, top k, renormalised; not so for
    top 1, where kiln softmaxes over all experts first (so Mixtral export refuses top_k 1)."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(top_k))
    probs, routing_map = topk_routing_with_score_function(logits, top_k, use_pre_softmax=False,
                                                          score_function="softmax")
    weights, chosen = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)  # MixtralSparseMoeBlock
    weights /= weights.sum(dim=-1, keepdim=True)
    mixtral_probs = torch.zeros_like(logits).scatter(1, chosen, weights)
    assert torch.equal(routing_map, mixtral_probs > 0)
    assert torch.allclose(probs, mixtral_probs, atol=1e-6)
    top1, _ = topk_routing_with_score_function(logits, 1, use_pre_softmax=True, score_function="softmax")
    assert (top1.sum(dim=-1) < 1).all()  # Mixtral's top-1 weight is 1


# -- what Mixtral cannot hold -------------------------------------------------------------------
@pytest.mark.parametrize("moe, named", [
    (dict(expert_bias=True, score_function="sigmoid"), "model.moe.expert_bias true"),
    (dict(score_function="sigmoid"), "model.moe.score_function sigmoid"),
    (dict(shared_experts=1), "model.moe.shared_experts 1"),
    (dict(layer_freq=2), "model.moe.layer_freq 2"),
    (dict(top_k=1), "model.moe.top_k 1"),
])
def test_export_refusals_name_the_setting(moe, named):
    model = ModelConfig(moe=MoeConfig(num_experts=4, **moe))
    with pytest.raises(KilnConfigError, match=named):
        mixtral.shape_of(model, 1000)


def test_export_of_a_checkpoint_mixtral_cannot_hold_stops_before_loading(tmp_path, capsys):
    step = tmp_path / "step_000002"
    step.mkdir()
    moe = {"num_experts": 4, "expert_bias": True, "score_function": "sigmoid"}
    (step / "kiln.json").write_text(json.dumps({"step": 2, "parts": {}, "config": {"model": {"moe": moe}, "data": {}}}))
    code, _, err = kiln_here(capsys, "ckpt", "export", str(step), "--hf", str(tmp_path / "out"))
    assert code == 2 and "model.moe.expert_bias true (Mixtral's router has no expert bias" in err
    assert "model.moe.score_function sigmoid" in err and not (tmp_path / "out").exists()


def test_hf_config_refusals_name_the_setting():
    good = {**TINY_MIXTRAL, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "sliding_window": None}
    section = mixtral.model_section_from_hf(good, "x")
    assert section["moe"] == {"num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 64, "aux_loss_coeff": 0.01}
    assert "ffn_hidden_size" not in section  # no layer is dense
    assert mixtral.model_section_from_hf({**good, "sliding_window": 128}, "x")  # as long as the sequence: no window
    for bad, words in [({"sliding_window": 64}, "sliding_window 64"),
                       ({"num_experts_per_tok": 1}, "num_experts_per_tok 1"),
                       ({"architectures": ["MixtralForSequenceClassification"]}, "kiln imports only Llama and Mixtral"),
                       ({"hidden_act": "gelu"}, "hidden_act 'gelu'")]:
        with pytest.raises(KilnConfigError, match=words):
            mixtral.model_section_from_hf({**good, **bad}, "x")


# -- logits parity under expert parallelism ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.extended
def test_weights_filled_over_two_expert_parallel_ranks_give_the_hf_logits(tmp_path):
    """The import's filling with EP=2 (each rank 4 of the 8 experts, all-to-all dispatch): the logits
    transformers gives, on both ranks (every token routed to experts on both)."""
    hf = random_mixtral(seed=1, vocab_size=1000)
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    per_rank = run_distributed(kiln_logits_of_hf, 2, [(str(tmp_path / "hf"), tokens)], ("parallel.ep=2",))
    for (logits,) in per_rank:
        assert (torch.from_numpy(logits) - want).abs().max() < 1e-4


# -- the commands -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "mixtral"
    random_mixtral(seed=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> tuple[Path, float]:
    """(run directory, its val_loss at the last step): configs/tiny-moe.yaml, EP=2 over 2 processes."""
    from kiln.data.bundled import ensure_bundled_dataset
    from tests.kiln_run import TINY_MOE, train

    val = ensure_bundled_dataset(128, str(cache / "datasets"))  # the training data's cache entry, shared
    run_dir = tmp_path_factory.mktemp("run") / "tiny-moe"
    metrics = train(run_dir, 2, "train.max_steps=3", "checkpoint.every=3", "logging.wandb=disabled",
                    f"data.val.path={val}", "data.val.batches=2", cache_dir=cache,
                    config=TINY_MOE)
    (last,) = [m for m in metrics if "val_loss" in m]
    return run_dir, last["val_loss"]


@pytest.mark.slow
def test_export_of_an_ep2_run_scores_its_validation_data_in_transformers_as_training_did(trained, tmp_path, capsys):
    from tests.test_generate_eval import transformers_val_losses

    run_dir, val_loss = trained
    code, out, _ = kiln_here(capsys, "ckpt", "export", str(run_dir / "checkpoints"), "--hf", str(tmp_path / "hf"))
    assert code == 0 and "Hugging Face MixtralForCausalLM" in out and "in fp32" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 8
    assert config["intermediate_size"] == 64 and config["router_aux_loss_coef"] == 0.01
    assert not any(name.startswith("chained_") for name in read_safetensors(tmp_path / "hf"))
    step_dir = next((run_dir / "checkpoints").glob("step_*"))
    per_rank = run_distributed(transformers_val_losses, 2, str(step_dir), str(tmp_path / "hf"))  # dp = 2
    losses = [loss for rank in per_rank for loss in rank]
    assert len(losses) == 4
    assert sum(losses) / len(losses) == pytest.approx(val_loss, abs=1e-4)


@pytest.mark.slow
@pytest.mark.extended
def test_hf_to_ep2_checkpoint_to_hf_is_exact(hf_dir, tmp_path, capsys):
    from tests.kiln_run import kiln

    out = tmp_path / "ckpt"
    kiln("ckpt", "import", "--hf", str(hf_dir), str(out), "configs/tiny-moe.yaml", "--nproc-per-node", "2")
    meta = json.loads((out / "step_000000" / "kiln.json").read_text())
    assert meta["config"]["parallel"]["ep"] == 2 and meta["imported"]["format"] == "hf-mixtral"
    assert kiln_here(capsys, "ckpt", "export", str(out), "--hf", str(tmp_path / "back"))[0] == 0
    want, got = read_safetensors(hf_dir), read_safetensors(tmp_path / "back")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)  # each rank filled its own experts
    source = json.loads((hf_dir / "config.json").read_text())
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    shared = (source.keys() & exported.keys()) - {"torch_dtype", "dtype", "transformers_version"}
    assert {"num_local_experts", "num_experts_per_tok", "intermediate_size", "router_aux_loss_coef",
            "sliding_window", "head_dim", "num_key_value_heads", "rope_theta"} <= shared
    assert {key: exported[key] for key in shared} == {key: source[key] for key in shared}


def test_import_refuses_a_config_whose_routing_mixtral_lacks(hf_dir, tmp_path, capsys):
    code, _, err = kiln_here(capsys, "ckpt", "import", "--hf", str(hf_dir), str(tmp_path / "out"),
                             "configs/tiny-moe.yaml", "model.moe.top_k=4", "model.moe.expert_ffn_hidden_size=32")
    assert code == 2
    assert "model.moe.top_k: HF model 2, config 4" in err and "model.moe.expert_ffn_hidden_size: HF model 64" in err
    code, _, err = kiln_here(capsys, "ckpt", "import", "--hf", str(hf_dir), str(tmp_path / "out"),
                             "configs/tiny-moe.yaml", "model.moe.expert_bias=true", "model.moe.score_function=sigmoid")
    assert code == 2 and "model.moe.expert_bias true" in err
    code, _, err = kiln_here(capsys, "ckpt", "import", "--hf", str(hf_dir), str(tmp_path / "out"), "configs/tiny.yaml")
    assert code == 2 and "model.moe.num_experts: HF model 8, config 0" in err
    assert not list(tmp_path.iterdir())


def test_export_takes_an_moe_runs_master_weights_from_both_chained_optimizers(tmp_path):
    """A bf16 MoE run: megatron-core chains a dense and an expert optimizer, each prefixing its state."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    from kiln.checkpoint import store, tools
    from kiln.hf.export import exported_weights

    router, experts = torch.randn(2, 4, 8), torch.randn(2, 4, 6, 8)
    state = {"decoder.layers.mlp.router.weight": router.to(torch.bfloat16),
             "decoder.layers.mlp.experts.experts.linear_fc2.weight": experts.to(torch.bfloat16),
             "chained_0.optimizer.state.fp32_param.decoder.layers.mlp.router.weight": router,
             "chained_0.optimizer.state.exp_avg.decoder.layers.mlp.router.weight": torch.zeros(2, 4, 8),
             "chained_1.optimizer.state.fp32_param.decoder.layers.mlp.experts.experts.linear_fc2.weight": experts}
    save(state, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    store.write_manifest(tmp_path, 2, store.describe_files(tmp_path, sorted(p.name for p in tmp_path.iterdir())))
    entries, _ = tools.list_entries(tools.read_dcp_index(tmp_path))
    assert {entry.name for entry in entries if entry.kind == "model"} == set(list(state)[:2])
    weights = exported_weights(tmp_path, checksums=True)
    assert weights.keys() == set(list(state)[:2])
    assert torch.equal(weights["decoder.layers.mlp.router.weight"], router)
    assert torch.equal(weights["decoder.layers.mlp.experts.experts.linear_fc2.weight"], experts)
