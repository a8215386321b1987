"""Hugging Face Llama ↔ kiln: the name/layout mapping, logits parity, `kiln ckpt export --hf` and
`kiln ckpt import --hf` (round trip through a TP=2 checkpoint, resumed training, errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.errors import KilnConfigError
from kiln.hf import llama
from tests.distributed import run_distributed

# configs/tiny.yaml's model: 2 layers, hidden 64, 4 heads, 2 kv heads, ffn 256; the bundled tokenizer's
# 4096 tokens, whose <|endoftext|> (id 0) is kiln's EOS.
TINY_LLAMA = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, vocab_size=4096, max_position_embeddings=128, rope_theta=10000.0,
                  rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)


def random_llama(tie: bool = False, seed: int = 0, **changes):
    """A small random ``LlamaForCausalLM`` (fp32, eager attention), norms not all ones."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **changes}, tie_word_embeddings=tie,
                                      attn_implementation="eager", torch_dtype="float32")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # so a swapped or missed norm shows in the logits
    return model


def shape_of(config) -> llama.LlamaShape:
    return llama.LlamaShape(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                            config.num_key_value_heads, config.intermediate_size, config.vocab_size,
                            config.tie_word_embeddings)


# -- the mapping --------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 4, 1])
def test_mapping_round_trips_every_tensor(tie, kv_heads):
    shape = llama.LlamaShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=kv_heads, ffn_hidden_size=96,
                             vocab_size=1000, tie_embeddings=tie)
    generator = torch.Generator().manual_seed(kv_heads)
    hf = {name: torch.randn(_hf_shape(name, shape), generator=generator) for name in llama.hf_names(shape)}
    kiln = llama.hf_to_kiln(hf, shape, padded_vocab=1024)
    assert kiln["embedding.word_embeddings.weight"].shape == (1024, 64)
    assert torch.equal(kiln["embedding.word_embeddings.weight"][1000:], torch.zeros(24, 64))
    assert kiln["decoder.layers.self_attention.linear_qkv.weight"].shape == (2, (4 + 2 * kv_heads) * 16, 64)
    assert ("output_layer.weight" in kiln) == (not tie)
    back = llama.kiln_to_hf(kiln, shape)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[name], hf[name]) for name in hf)


def test_fused_qkv_rows_are_grouped_per_query_group():
    """megatron-core's order: group g holds its query heads, then its key head, then its value head."""
    shape = llama.LlamaShape(1, 8, num_heads=4, num_kv_heads=2, ffn_hidden_size=8, vocab_size=8, tie_embeddings=False)
    head = torch.arange(4).repeat_interleave(2).unsqueeze(1).float()  # row r belongs to head r // 2
    qkv = llama.fuse_qkv(head, 10 + head[:4], 20 + head[:4], shape)
    assert qkv[:, 0].tolist() == [0, 0, 1, 1, 10, 10, 20, 20, 2, 2, 3, 3, 11, 11, 21, 21]


def test_per_layer_and_local_spec_norm_names_export_too():
    shape = llama.LlamaShape(1, 8, 2, 1, 16, 8, True)
    stacked = llama.hf_to_kiln({name: torch.randn(_hf_shape(name, shape)) for name in llama.hf_names(shape)}, shape, 8)
    per_layer = {name.replace("decoder.layers.", "decoder.layers.0."): value[0] if name.startswith("decoder.layers.")
                 else value for name, value in stacked.items()}
    norm = per_layer.pop("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
    per_layer["decoder.layers.0.input_layernorm.weight"] = norm
    assert torch.equal(llama.kiln_to_hf(per_layer, shape)["model.layers.0.input_layernorm.weight"], norm)


def test_unknown_tensors_are_refused_both_ways():
    shape = llama.LlamaShape(1, 8, 2, 1, 16, 8, False)
    hf = {name: torch.randn(_hf_shape(name, shape)) for name in llama.hf_names(shape)}
    with pytest.raises(KilnConfigError, match="unexpected model.layers.0.self_attn.q_proj.bias"):
        llama.hf_to_kiln({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(8)}, shape, 8)
    kiln = llama.hf_to_kiln(hf, shape, 8)
    from kiln.errors import KilnCheckpointError

    with pytest.raises(KilnCheckpointError, match="mlp.router.weight"):
        llama.kiln_to_hf({**kiln, "decoder.layers.mlp.router.weight": torch.zeros(1, 4, 8)}, shape)


def _hf_shape(name: str, shape: llama.LlamaShape) -> tuple[int, ...]:
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    sizes = {"q_proj": (shape.num_heads * d, h), "k_proj": (shape.num_kv_heads * d, h),
             "v_proj": (shape.num_kv_heads * d, h), "o_proj": (h, shape.num_heads * d), "gate_proj": (f, h),
             "up_proj": (f, h), "down_proj": (h, f), "embed_tokens": (shape.vocab_size, h),
             "lm_head": (shape.vocab_size, h)}
    for key, size in sizes.items():
        if f".{key}." in f".{name}":
            return size
    return (h,)  # the norms


def test_hf_config_refusals_name_the_setting():
    good = {**TINY_LLAMA, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert llama.model_section_from_hf(good, "x")["num_query_groups"] == 2
    for bad, words in [({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "kiln imports only Llama"),
                       ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
                       ({"attention_bias": True}, "attention_bias true"),
                       ({"mlp_bias": True}, "mlp_bias true"),
                       ({"head_dim": 32}, "head_dim 32")]:
        with pytest.raises(KilnConfigError, match=words):
            llama.model_section_from_hf({**good, **bad}, "x")


# -- logits parity ------------------------------------------------------------------------------
def _kiln_logits_of_hf(rank: int, hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """Build kiln's model (TP=1, CPU) with the HF weights filled in; its logits on ``tokens``."""
    from kiln.config import config_from_dict
    from kiln.hf.weights import HFWeights, fill_model_parts
    from kiln.model.builder import build_model
    from kiln.parallel.backend import init_parallel
    from kiln.plan.params import padded_vocab_size

    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    model = llama.model_section_from_hf(hf_config, hf_dir)
    config = config_from_dict({"model": model}, ["train.precision=fp32", "train.device=cpu"])
    ctx = init_parallel("cpu", 0, config.layout)
    (part,) = build_model(config.model, config.parallel, config.train, ctx, model["vocab_size"])
    shape = llama.LlamaShape.of(config.model, config.model.vocab_size)
    fill_model_parts([part], HFWeights(Path(hf_dir)), shape, padded_vocab_size(shape.vocab_size, config.model))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return part.eval()(tokens, positions)[..., : shape.vocab_size]


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4), (False, 1)])
def test_imported_weights_give_the_hf_logits(tmp_path, tie, kv_heads):
    hf = random_llama(tie=tie, num_key_value_heads=kv_heads, vocab_size=1000)
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    (got,) = run_distributed(_kiln_logits_of_hf, 1, str(tmp_path), tokens)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-4
