"""Mixture-of-experts layers: model.moe as megatron-core's MoE settings, and the layer-wise record
of how tokens were routed (the load-balancing metrics).

megatron-core builds the MoE layer (router, token dispatcher, experts) from the layer spec
(kiln.kernels.spec) and these TransformerConfig settings; expert parallelism comes from the
expert process groups :func:`kiln.parallel.backend.init_parallel` creates.
"""

from __future__ import annotations

from typing import Any

from kiln.config import ModelConfig


def moe_transformer_settings(model: ModelConfig, layout, *, grouped_gemm: bool) -> dict[str, Any]:
    """megatron-core TransformerConfig arguments for model.moe (none for a dense model)."""
    moe = model.moe
    if not moe.enabled:
        return {}
    from kiln.parallel.megatron_compat import allow_moe_without_transformer_engine

    allow_moe_without_transformer_engine()
    balancing = moe.load_balancing if moe.aux_loss_coeff > 0 else "none"
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=model.expert_ffn_size,
        moe_shared_expert_intermediate_size=moe.shared_experts * model.expert_ffn_size or None,
        moe_layer_freq=moe.layer_freq,
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff if balancing != "none" else 0.0,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.expert_bias_update_rate,
        moe_router_score_function=moe.score_function,
        # A softmax over a single chosen expert is 1 (and its gradient 0): softmax over all first.
        moe_router_pre_softmax=moe.top_k == 1 and moe.score_function == "softmax",
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.drop_policy,
        moe_router_dtype="fp32" if moe.router_fp32 else None,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_grouped_gemm=grouped_gemm,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
    )
