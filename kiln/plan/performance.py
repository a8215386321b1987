"""Step time, tokens/s and MFU of a layout from a roofline whose assumptions are printed.

The step is compute at a fraction of the accelerator's dense peak (``efficiency``: what
well-shaped transformer GEMMs reach, 0.55 by default on current NVIDIA parts), plus the
communication the layout exposes:

* tensor parallelism: per layer and micro-batch, two all-reduces forward and two backward
  (reduce-scatter + all-gather pairs with sequence parallelism, the same volume) of the
  [tokens, hidden] activations, over NVLink inside a node, not overlapped (Narayanan et al.
  2021, section 3.2; unless ``parallel.tp_comm_overlap``, assumed to hide ``TP_OVERLAP``);
* expert parallelism (model.moe): per MoE layer and micro-batch, the token dispatcher's dispatch and
  combine, forward and backward: all-to-alls that send each routed token's top_k copies of the
  hidden state to their experts' ranks ((ep − 1)/ep of them leave the rank), or with the allgather
  dispatcher every rank gathering its ep group's tokens; over NVLink while an expert group
  (expert_tp × ep consecutive ranks) stays inside a node, not overlapped. Routing is taken as
  balanced (in a real run the busiest expert sets the pace), and the expert-TP gathers as the
  dense MLP's, which the TP term counts;
* context parallelism: the ring passes keys and values (and their gradients back) cp − 1
  hops per layer, overlapped with the attention blocks they wait for;
* data parallelism: the fp32 gradient all-reduce (reduce-scatter + parameter all-gather with a
  sharded optimizer; parameter all-gathers in forward and backward for ZeRO-3 and FSDP), over
  the network once the data-parallel group leaves the node, overlapped with backward
  (megatron-core's ``overlap_grad_reduce``, ZeRO's ``overlap_comm``, FSDP's prefetch);
* the pipeline bubble, (p − 1)/(m·v) of the pipelined time (Narayanan et al. 2021, section 2.2).

MFU is model FLOPs (no recomputation) per second over the peak (Chowdhery et al. 2022, appendix B).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kiln.config import RunConfig
from kiln.parallel.layout import ParallelLayout
from kiln.plan.flops import flops_per_token, recompute_flops_per_token
from kiln.plan.hardware import Accelerator
from kiln.plan.memory import dtype_bytes, layers_per_stage, planned_state, rank_share
from kiln.plan.params import count_parameters

EFFICIENCY = 0.55
TP_OVERLAP = 0.6  # share of TP communication hidden by parallel.tp_comm_overlap (userbuffers)
OPTIMIZER_PASSES = 2  # Adam reads and writes its fp32 state once per step: memory-bound


@dataclass(frozen=True)
class Throughput:
    flops_per_token: float
    """Model FLOPs per token (6 per parameter + attention), what MFU counts."""
    model_flops_per_step: float
    hardware_flops_per_step: float
    """Model FLOPs plus what activation recomputation repeats."""
    step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    breakdown_s: dict[str, float]
    """compute, tp_comm, ep_comm, cp_comm_exposed, pipeline_bubble, dp_comm_exposed, optimizer."""
    assumptions: dict[str, object]

    def as_json(self) -> dict:
        return asdict(self)


def _bandwidth(group_span: int, accel: Accelerator) -> float:
    """Bytes/s of a collective over ranks ``group_span`` apart at most (consecutive ranks share a node)."""
    return (accel.nvlink_gbps if group_span <= accel.gpus_per_node else accel.network_gbps) * 1e9


def _ring(size: int) -> float:
    """The share of a ring collective's bytes each of ``size`` ranks sends."""
    return (size - 1) / size


def predict_throughput(config: RunConfig, layout: ParallelLayout, vocab_size: int, accel: Accelerator,
                       efficiency: float = EFFICIENCY) -> Throughput:
    m, p, train = config.model, config.parallel, config.train
    peak = accel.peak(train.precision)
    if peak is None:
        raise ValueError(f"{accel.name} has no {train.precision} tensor cores")
    world, tp, cp, pp, dp = layout.world_size, layout.tp, layout.cp, layout.pp, layout.dp
    vpp = layout.virtual_pp or 1
    micro = layout.num_microbatches(train)
    dtype = dtype_bytes(train.precision)
    tokens_per_step = train.global_batch_size * m.seq_len
    per_token = flops_per_token(m, vocab_size)
    model_flops = per_token * tokens_per_step
    hardware_flops = (per_token + recompute_flops_per_token(m, train.recompute)) * tokens_per_step
    compute = hardware_flops / world / (peak * efficiency)
    if train.precision == "fp8":  # the attention scores stay in bf16: only the linear layers' GEMMs run in fp8
        attention = 12.0 * m.num_layers * m.hidden_size * m.seq_len * tokens_per_step / world
        compute += attention / (accel.peak("bf16") * efficiency) - attention / (peak * efficiency)

    stage_depth = m.num_layers / pp
    micro_tokens = train.micro_batch_size * m.seq_len / cp
    activation_bytes = micro_tokens * m.hidden_size * dtype
    tp_comm = 0.0
    if tp > 1:
        all_reduces = 4 + (2 if train.recompute == "full" else 0)
        one = 2 * (tp - 1) / tp * activation_bytes / _bandwidth(tp, accel)
        tp_comm = micro * stage_depth * all_reduces * one * ((1 - TP_OVERLAP) if p.tp_comm_overlap else 1)
    ep_comm = 0.0
    moe = m.moe
    if moe.enabled and layout.ep > 1:
        routed = micro_tokens / tp * m.hidden_size * dtype  # a rank routes its own 1/tp (sequence parallel)
        leaving = routed * moe.top_k * (layout.ep - 1) / layout.ep if moe.token_dispatcher == "alltoall" \
            else routed * (layout.ep - 1)  # allgather: the other ep ranks' tokens come in
        collectives = 4 + (2 if train.recompute == "full" else 0)  # dispatch + combine, forward and backward
        moe_layers = len(moe.moe_layers(m.num_layers)) / pp
        ep_comm = micro * moe_layers * collectives * leaving / _bandwidth(layout.expert_tp * layout.ep, accel)
    cp_exposed = 0.0
    if cp > 1:
        kv_bytes = micro_tokens * 2 * m.query_groups * m.head_dim / tp * dtype
        ring = 3 * (cp - 1) * kv_bytes / _bandwidth(tp * cp, accel)  # K,V forward; K,V and dK,dV back
        attention = 12 * m.hidden_size * m.seq_len * micro_tokens / tp / (peak * efficiency)
        cp_exposed = micro * stage_depth * max(0.0, ring - attention)
    bubble = (pp - 1) / (micro * vpp) * (compute + tp_comm + ep_comm + cp_exposed) if pp > 1 else 0.0

    params = count_parameters(m, vocab_size, tp=tp)
    per_rank, stage_layers = params.per_rank(layout), layers_per_stage(layout, m.num_layers)
    fullest = max(range(pp), key=lambda stage: (per_rank[stage], stage_layers[stage]))
    state = planned_state(config, rank_share(config, layout, params, fullest, "cuda"))
    dense_traffic = state.gradient_traffic + state.parameter_traffic - state.expert_traffic
    dp_comm = (dense_traffic * _ring(dp) + state.expert_traffic * _ring(layout.expert_dp)) / _bandwidth(world, accel)
    dp_exposed = max(0.0, dp_comm - 2 / 3 * compute) if state.overlapped else dp_comm
    optimizer = OPTIMIZER_PASSES * state.optimizer / (accel.hbm_gbps * 1e9)
    step = compute + tp_comm + ep_comm + cp_exposed + bubble + dp_exposed + optimizer
    return Throughput(
        flops_per_token=per_token, model_flops_per_step=model_flops, hardware_flops_per_step=hardware_flops,
        step_time_s=step, tokens_per_s=tokens_per_step / step, tokens_per_s_per_gpu=tokens_per_step / step / world,
        mfu=model_flops / world / step / peak,
        breakdown_s={"compute": compute, "tp_comm": tp_comm, "ep_comm": ep_comm, "cp_comm_exposed": cp_exposed,
                     "pipeline_bubble": bubble, "dp_comm_exposed": dp_exposed, "optimizer": optimizer},
        assumptions={"gpu": accel.name, "peak_tflops": peak / 1e12, "efficiency": efficiency,
                     "nvlink_gbps": accel.nvlink_gbps, "network_gbps": accel.network_gbps,
                     "hbm_gbps": accel.hbm_gbps, "gpus_per_node": accel.gpus_per_node,
                     "tp_overlap": TP_OVERLAP if p.tp_comm_overlap else 0.0,
                     "dp_overlap": "with backward (2/3 of compute)" if state.overlapped else "none",
                     "pipeline_bubble": f"(p-1)/(m*v) = ({pp}-1)/({micro}*{vpp})",
                     **({"expert_dispatch": "not overlapped, balanced routing"} if moe.enabled else {})},
    )
