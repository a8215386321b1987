"""Mixture-of-experts layers: model.moe as megatron-core's MoE settings, and the layer-wise record
of how tokens were routed (the load-balancing metrics).

megatron-core builds the MoE layer (router, token dispatcher, experts) from the layer spec
(kiln.kernels.spec) and these TransformerConfig settings; expert parallelism comes from the
expert process groups :func:`kiln.parallel.backend.init_parallel` creates.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.config import ModelConfig
from kiln.parallel import collectives
from kiln.parallel.megatron_compat import moe_tracked_values, zero_moe_tracked_values


def moe_transformer_settings(model: ModelConfig, layout, *, grouped_gemm: bool) -> dict[str, Any]:
    """megatron-core TransformerConfig arguments for model.moe (none for a dense model)."""
    moe = model.moe
    if not moe.enabled:
        return {}
    from kiln.parallel.megatron_compat import allow_moe_without_transformer_engine

    allow_moe_without_transformer_engine()
    balancing = moe.load_balancing if moe.uses_aux_loss else "none"
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


# megatron-core's layer-wise tracker names → kiln's metric names.
_TRACKED_LOSSES = {"load_balancing_loss": "moe_aux_loss", "seq_load_balancing_loss": "moe_aux_loss",
                   "global_load_balancing_loss": "moe_aux_loss", "z_loss": "moe_z_loss"}


class RoutingRecorder:
    """How each MoE layer routed one training step's tokens, summed over the whole job.

    A forward hook on every router counts, per (global) layer, the tokens each expert received
    (megatron-core's routing map, after any capacity drop) and the token-expert pairs asked for
    (tokens × top_k). The counts stay on the device until a logged step reduces them: each rank
    routes its own tokens (its dp replica, its cp chunk, its sequence-parallel shard), so the sum
    over all ranks is the layer's load. The aux and z losses come from megatron-core's own tracker
    (values without their coefficients, summed over micro-batches).
    """

    def __init__(self, model_parts, moe, num_layers: int, num_microbatches: int) -> None:
        self.moe, self.num_layers, self.num_microbatches = moe, num_layers, num_microbatches
        self.device = collectives.bound_device()
        self.routed = torch.zeros(num_layers, moe.num_experts, dtype=torch.float64, device=self.device)
        self.asked = torch.zeros(num_layers, dtype=torch.float64, device=self.device)
        self.held = torch.zeros(num_layers, dtype=torch.float64)  # layers this rank holds (their router)
        self.handles = []
        for part in model_parts:
            for module in part.modules():
                if type(module).__name__ == "TopKRouter":
                    self.held[module.layer_number - 1] = 1.0
                    self.handles.append(module.register_forward_hook(self._count))

    def _count(self, router, inputs, outputs) -> None:
        # Skip evaluation, and activation recomputation re-running the router inside backward.
        if not router.training or torch._C._current_graph_task_id() != -1:
            return
        _probs, routing_map = outputs
        layer = router.layer_number - 1
        self.routed[layer] += routing_map.sum(dim=0, dtype=torch.float64)
        self.asked[layer] += routing_map.shape[0] * self.moe.top_k

    def start_step(self) -> None:
        self.routed.zero_()
        self.asked.zero_()
        zero_moe_tracked_values()

    def metrics(self) -> dict[str, float]:
        """The last step's routing metrics (collective: every rank calls it, with the same sizes
        whichever layers, and so which tracked losses, it holds)."""
        names = self.reported_losses()
        tracked = _tracked_losses()
        zeros = torch.zeros(self.num_layers, dtype=torch.float64)
        losses = [(tracked[name].double().cpu() if name in tracked else zeros) / self.num_microbatches
                  for name in names]
        reduced = torch.tensor(collectives.reduce_floats(torch.cat(
            [*losses, self.held, self.routed.flatten().cpu(), self.asked.cpu()]).tolist()), dtype=torch.float64)
        loss_sums, held, routed, asked = reduced.split(
            [len(names) * self.num_layers, self.num_layers, self.routed.numel(), self.num_layers])
        metrics = {}
        for name, sums in zip(names, loss_sums.view(len(names), self.num_layers)):
            per_layer = sums[held > 0] / held[held > 0]  # the mean over the ranks holding each layer
            metrics[name] = float(per_layer.mean())
        return {**metrics, **expert_load_metrics(routed.view_as(self.routed), asked,
                                                 self.moe.moe_layers(self.num_layers))}

    def reported_losses(self) -> list[str]:
        """The router losses the config turns on (the same on every rank)."""
        moe = self.moe
        return [name for name, on in (("moe_aux_loss", moe.uses_aux_loss), ("moe_z_loss", moe.z_loss_coeff > 0)) if on]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _tracked_losses() -> dict[str, torch.Tensor]:
    losses: dict[str, torch.Tensor] = {}
    for name, values in moe_tracked_values().items():
        metric = _TRACKED_LOSSES.get(name)
        if metric is not None:
            losses[metric] = losses[metric] + values if metric in losses else values.clone()
    return losses


def expert_load_metrics(routed, asked, moe_layers: list[int]) -> dict[str, float]:
    """Per MoE layer, from the tokens each expert received (``routed`` [layers, experts]) and the
    token-expert pairs asked for (``asked`` [layers]): the busiest expert's load over the mean
    (1.0 = balanced, num_experts = everything on one expert) and the coefficient of variation
    (std / mean over experts; 0 = balanced); over the layers, the worst max/mean, the mean CV and
    the fraction of pairs dropped at capacity."""
    metrics: dict[str, float] = {}
    max_over_mean, cv = [], []
    for layer in moe_layers:
        load = routed[layer]
        mean = float(load.mean())
        if mean <= 0:
            continue
        max_over_mean.append(float(load.max()) / mean)
        cv.append(float(load.std(unbiased=False)) / mean)
        metrics[f"moe_load_max_over_mean_layer_{layer}"] = max_over_mean[-1]
        metrics[f"moe_load_cv_layer_{layer}"] = cv[-1]
    if cv:
        metrics["moe_load_max_over_mean"] = max(max_over_mean)
        metrics["moe_load_cv"] = sum(cv) / len(cv)
    total_asked = float(asked[moe_layers].sum())
    if total_asked > 0:
        metrics["moe_dropped_fraction"] = 1.0 - float(routed[moe_layers].sum()) / total_asked
    return metrics


def mark_expert_parameters(model: torch.nn.Module) -> None:
    """Give every routed expert's weights megatron-core's expert-parallel mark (``allreduce=False``)
    whatever parallel.ep is.

    megatron-core marks them only when ep > 1; with ep = 1 they are reduced and stepped with the
    dense weights, in one optimizer, while ep > 1 chains a dense and an expert optimizer, whose
    checkpoint keys differ (``chained_<i>.`` prefixes). Marked always, an MoE checkpoint has one
    format, and a run saved with ep=2 resumes with ep=1 and back. (With ep = 1 the expert data-
    parallel group is the dense one, so the reduction is the same.)
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
