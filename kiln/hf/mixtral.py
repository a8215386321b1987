"""kiln's mixture-of-experts GPT ↔ Hugging Face ``MixtralForCausalLM``: the MoE layers' names, config.

Attention, norms, embeddings and vocabulary padding are Llama's (kiln.hf.llama, whose machinery
maps both); each layer's MLP is a router and ``num_experts`` SwiGLU experts:

* ``mlp.router.weight`` ``[E, h]`` is ``block_sparse_moe.gate.weight``, rows in expert order.
* ``mlp.experts.experts.linear_fc1.weight`` ``[E, 2f, h]`` (rows ``[gate; up]`` like the dense fc1)
  is each expert's ``w1`` (gate) and ``w3`` (up); ``linear_fc2`` ``[E, h, f]`` is ``w2``. The
  checkpoint stacks experts after layers, ``[num_layers, E, …]``; under expert parallelism each
  rank holds a run of whole experts (megatron-core's global expert offsets, as a checkpoint load).

Routing is the same function: megatron-core (softmax scores, no pre-softmax) takes the top k
logits and a softmax over those k; Mixtral takes a softmax over all experts, its top k, and
renormalises them to sum to 1, which is the same softmax over the chosen k. What Mixtral cannot
express is refused (:func:`differences`): dense layers between MoE ones, shared experts,
sigmoid scores, the expert bias, and top-1 routing (kiln then weights the expert by its softmax
over all experts, Mixtral by 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from kiln.errors import KilnConfigError
from kiln.hf import llama

ARCHITECTURE = "MixtralForCausalLM"
FORMAT = "hf-mixtral"
ROUTER = "mlp.router.weight"
EXPERT_FC1 = "mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.experts.linear_fc2.weight"
_MOE = "block_sparse_moe."
# Llama's attention and norms, and the MoE MLP in place of the dense one.
LAYER_WEIGHTS: dict[str, tuple[str, ...]] = {
    **{suffix: hf_names for suffix, hf_names in llama.LAYER_WEIGHTS.items()
       if suffix not in (llama.FC1, "mlp.linear_fc2.weight")},
    ROUTER: (_MOE + "gate.weight",),
    EXPERT_FC1: (_MOE + "experts.{expert}.w1.weight", _MOE + "experts.{expert}.w3.weight"),
    EXPERT_FC2: (_MOE + "experts.{expert}.w2.weight",),
}


@dataclass(frozen=True)
class MixtralShape(llama.LlamaShape):
    """Llama's sizes with ``ffn_hidden_size`` one expert's (Mixtral's intermediate_size)."""

    num_experts: int
    family: ClassVar[str] = "Mixtral"
    layer_weights: ClassVar[dict[str, tuple[str, ...]]] = LAYER_WEIGHTS


def differences(model) -> list[str]:
    """Each setting of a kiln ``ModelConfig``'s model.moe that Mixtral has no form for, and why."""
    moe = model.moe
    found = []
    if moe.layer_freq != 1:
        found.append(f"model.moe.layer_freq {moe.layer_freq} (every Mixtral layer is MoE: the dense layers between "
                     f"have no place in it)")
    if moe.shared_experts:
        found.append(f"model.moe.shared_experts {moe.shared_experts} (Mixtral has no shared experts)")
    if moe.score_function != "softmax":
        found.append(f"model.moe.score_function {moe.score_function} (Mixtral's router scores are a softmax)")
    if moe.expert_bias:
        found.append("model.moe.expert_bias true (Mixtral's router has no expert bias: its routing would change)")
    if moe.top_k == 1:
        found.append("model.moe.top_k 1 (kiln weights the one expert by its softmax over all experts, Mixtral by 1)")
    return found


def shape_of(model, vocab_size: int) -> MixtralShape:
    """From a kiln ``ModelConfig`` with model.moe; one error naming every setting Mixtral cannot hold."""
    refused = differences(model)
    if refused:
        raise KilnConfigError(f"the model is not one Mixtral can hold ({'; '.join(refused)}); Mixtral is an MoE "
                              f"layer everywhere with softmax top-k routing (k >= 2) and no shared experts")
    dense = llama.LlamaShape.of(model, vocab_size)
    return MixtralShape(**{**asdict(dense), "ffn_hidden_size": model.expert_ffn_size},
                        num_experts=model.moe.num_experts)


def hf_config(model, shape: MixtralShape, dtype: str, eos_id: int | None, bos_id: int | None) -> dict[str, Any]:
    """``config.json`` of the exported ``MixtralForCausalLM``: Llama's fields and the experts'."""
    moe = model.moe
    config = {
        **llama.hf_config(model, shape, dtype, eos_id, bos_id),
        "architectures": [ARCHITECTURE],
        "model_type": "mixtral",
        "num_local_experts": shape.num_experts,
        "num_experts_per_tok": moe.top_k,
        # HF's aux loss is the Switch Transformer one over all tokens (load_balancing aux_loss).
        "router_aux_loss_coef": moe.aux_loss_coeff if moe.load_balancing != "none" else 0.0,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
    }
    for key in ("attention_bias", "mlp_bias"):  # LlamaConfig's, not MixtralConfig's
        del config[key]
    return config


def model_section_from_hf(config: dict[str, Any], where: str) -> dict[str, Any]:
    """kiln's ``model:`` settings of an HF Mixtral ``config.json``; refuses what kiln's GPT cannot express."""
    llama.require_model_type(config, where, "mixtral", ARCHITECTURE)
    refusals = []
    window, positions = config.get("sliding_window"), config.get("max_position_embeddings", 2048)
    if window is not None and window < positions:
        refusals.append(f"sliding_window {window} (kiln's attention sees the whole sequence, up to "
                        f"max_position_embeddings {positions})")
    if config["num_experts_per_tok"] == 1:
        refusals.append("num_experts_per_tok 1 (kiln weights a lone expert by its softmax over all experts, "
                        "Mixtral by 1)")
    return {**llama.decoder_section(config, where, tuple(refusals)),
            # every layer is MoE: the dense ffn_hidden_size is left unset (no layer has that MLP)
            "moe": {"num_experts": config["num_local_experts"], "top_k": config["num_experts_per_tok"],
                    "expert_ffn_hidden_size": config["intermediate_size"],
                    "aux_loss_coeff": config.get("router_aux_loss_coef", 0.0)}}
