"""Memory per GPU (or per CPU process) of a run, before it runs: what ``kiln plan`` reports and
what ``kiln train`` checks before launch.

Four parts, on the pipeline stage that needs the most:

* **model states** (parameters, gradients, optimizer state) by engine: the ZeRO accounting of
  Rajbhandari et al. 2020 ("ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models", section 3.1 and figure 1: (2 + 2 + K)·Ψ bytes for mixed-precision Adam, K = 12,
  each stage dividing a term by N_d), with the bytes each kiln engine actually keeps
  (megatron-core reduces gradients in fp32; ZeRO keeps fp32 master partitions even in fp32).
* **activations**: counted tensor by tensor, in the manner of Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", section 4: s·b·h·(34 +
  5·a·s/h) for GPT), for kiln's Llama layer: RMSNorm, fused QKV with grouped-query attention
  and RoPE, a fused attention kernel (no s² scores: FlashAttention-style kernels keep only the
  output and the log-sum-exp), SwiGLU. Each count is what autograd saves, checked on the CPU
  spec with ``saved_tensors_hooks``: tests/test_plan.py. Tensor parallelism divides the
  attention and MLP internals; sequence parallelism also the norms and the linear inputs;
  context parallelism the sequence. The first pipeline stage holds the most micro-batches in
  flight: min(m, p) with 1F1B, and L·(1 + (p−1)/(p·v)) layers' worth interleaved (Korthikanti
  et al., section 4.2.3).
* **output layer and loss**: the final norm, and kiln's chunked cross-entropy's chunk of fp32
  logits (or the whole [tokens, vocab/tp] logits with ``kernels.cross_entropy=plain``).
* **buffers**: communication buckets, gathered parameters (ZeRO-3, FSDP), and on GPUs the
  caching allocator's fragmentation and the CUDA context with NCCL's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kiln.config import RunConfig
from kiln.engine import engine_class
from kiln.engine.base import PlannedState, RankShare
from kiln.parallel.layout import ParallelLayout
from kiln.plan.params import ParamCount, count_parameters

GB = 1e9  # the ZeRO paper's unit
GIB = 2**30
CUDA_CONTEXT_BYTES = int(1.0 * GIB)  # CUDA context, cuBLAS workspaces, NCCL channel buffers (outside torch's allocator)
CPU_RUNTIME_BYTES = int(0.5 * GIB)  # a CPU worker's own memory for its interpreter and libraries (their code pages are shared)
ALLOCATOR_SLACK = 0.08  # the caching allocator's fragmentation: reserved exceeds allocated by this fraction
ZERO_K = 12  # Adam in mixed precision: fp32 master weights, momentum, variance (4 + 4 + 4 bytes)


def zero_model_state_bytes(psi: float, dp: int, stage: int, k: int = ZERO_K,
                           param_bytes: int = 2, grad_bytes: int = 2) -> tuple[float, float, float]:
    """(parameter, gradient, optimizer) bytes per GPU of Ψ parameters under ZeRO stage 0 to 3 over
    N_d = ``dp`` ranks: the paper's (2 + 2 + K)·Ψ, with the optimizer states (stage 1), gradients (2)
    and parameters (3) divided by N_d. Rajbhandari et al. 2020, figure 1."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0..3, got {stage}")
    params = param_bytes * psi / (dp if stage >= 3 else 1)
    grads = grad_bytes * psi / (dp if stage >= 2 else 1)
    optimizer = k * psi / (dp if stage >= 1 else 1)
    return params, grads, optimizer


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device on the pipeline stage that needs the most."""

    stage: int
    items: dict[str, int]
    """parameters, gradients, optimizer, activations, output_and_loss, buffers, allocator_and_context."""
    capacity: int | None
    """The device's memory in bytes; None when unknown."""
    notes: dict[str, str] = field(default_factory=dict)
    """How each item was counted, for the report."""

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    @property
    def biggest(self) -> str:
        return max(self.items, key=self.items.get)


def layers_per_stage(layout: ParallelLayout, num_layers: int) -> list[int]:
    """Transformer layers on each pipeline rank (all its virtual chunks)."""
    return [sum(end - start for start, end in chunks) for chunks in layout.stage_layers(num_layers)]


def dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2  # fp8 runs keep bf16 weights and activations between GEMMs


def _uses_te(device_type: str) -> bool:
    """GPU runs use Transformer Engine's layer spec (the gpu extra installs it), CPU runs the local one."""
    return device_type == "cuda"


# Dropless routing under expert parallelism: the busiest rank's token copies over the mean. Routing
# is far from balanced at initialisation (load max/mean 2-4 per expert); bench/memory.py's mid-size
# MoE case (EP=2) peaks at 2.1x the balanced count.
DROPLESS_EP_PEAK_LOAD = 2.0


def busiest_expert_rank_load(moe, layout: ParallelLayout) -> float:
    """The token copies the busiest expert-parallel rank computes, over the balanced count: at most the
    capacity factor when tokens are dropped past it; without EP every rank computes its own tokens'."""
    if layout.ep == 1:
        return 1.0
    return moe.capacity_factor if moe.capacity_factor is not None else DROPLESS_EP_PEAK_LOAD


def layer_activation_bytes(config: RunConfig, layout: ParallelLayout, device_type: str) -> float:
    """Bytes autograd keeps for one transformer layer and one micro-batch on one rank."""
    m, p, train = config.model, config.parallel, config.train
    tokens = train.micro_batch_size * m.seq_len / layout.cp
    h, f, a, g, d = m.hidden_size, m.ffn_size, m.num_attention_heads, m.query_groups, m.head_dim
    t = layout.tp
    dtype = dtype_bytes(train.precision)
    if train.recompute == "full":
        # Only each layer's input stays (sharded with SP); backward re-runs one layer at a time,
        # whose activations are the transient counted by :func:`estimate_memory`.
        return tokens * h * dtype / (t if p.sequence_parallel else 1)
    if _uses_te(device_type):
        # TE's LayerNormLinear keeps its input, the 1/rms and its normalized output; megatron's fused
        # SwiGLU keeps its input (gate and up) only.
        norms, mlp = 2 * (2 * h) + 2, 2 * f + f
    else:
        # torch RMSNorm keeps input, x/rms and 1/rms, and the linear keeps the norm's output; the
        # unfused SwiGLU keeps gate and up, silu(gate), silu(gate)·up's operands and fc2's input.
        norms, mlp = 2 * (3 * h + 1), 2 * f + 3 * f
    if m.moe.enabled:
        # An MoE layer (the larger, when layers mix): each token's top_k copies pass through an expert
        # (balanced routing: a rank computes as many token copies as it routes), with the permuted
        # input kept per copy, plus the shared experts and the fp32 router scores. A rank routes its
        # own 1/tp of the tokens (sequence parallel; the division by t below), and the dispatcher
        # gathers the copies over expert_tp, each rank computing 1/expert_tp of every expert's width:
        # per routed token, top_k × expert_tp copies of (hidden inputs + f_e / expert_tp wide internals).
        # Measured on the local spec (autograd's saved tensors): per copy the permuted input and
        # six expert-wide tensors (fc1's output, silu(gate), and the product kept both as the
        # multiplication's operand and as fc2's input); the unfused dense SwiGLU keeps five.
        f_e, moe = m.expert_ffn_size, m.moe
        per_expert = 2 * f_e + f_e if _uses_te(device_type) else 2 * f_e + 4 * f_e
        shared = mlp * moe.shared_experts * f_e / f
        routed = moe.top_k * (per_expert + h * layout.expert_tp) * busiest_expert_rank_load(m.moe, layout) \
            + shared + moe.num_experts * 4 / dtype
        has_dense_layers = len(moe.moe_layers(m.num_layers)) < m.num_layers
        mlp = max(mlp, routed) if has_dense_layers else routed
    # q and k after RoPE, the fused QKV output (v is a view of it), and the attention output (also
    # the output projection's input); the log-sum-exp is fp32, one per head.
    attention = 3 * a * d + 3 * g * d
    lse_bytes = a * 4
    replicated = norms * dtype  # the norms' tensors and the layer's residual stream
    sharded = (attention + mlp) * dtype + lse_bytes
    if train.recompute == "selective" and "core_attn" in train.recompute_modules:
        sharded -= lse_bytes  # the attention core re-runs in backward; its inputs are kept anyway
    per_token = replicated / (t if p.sequence_parallel else 1) + sharded / t
    return tokens * per_token


def in_flight_layer_microbatches(config: RunConfig, layout: ParallelLayout, stage: int, layers: int) -> float:
    """Layer-micro-batches whose activations a pipeline stage holds at its peak (1F1B: the stage's
    warm-up micro-batches plus one; interleaved: megatron-core's warm-up over model chunks)."""
    micro = layout.num_microbatches(config.train)
    pp, v = layout.pp, layout.virtual_pp or 1
    if pp == 1:
        return layers  # one micro-batch's forward, then its backward
    if v == 1:
        return layers * min(pp - stage, micro)
    chunks_in_flight = min((pp - stage - 1) * 2 + (v - 1) * pp + 1, micro * v)
    return layers / v * chunks_in_flight


def rank_share(config: RunConfig, layout: ParallelLayout, params: ParamCount, stage: int,
               device_type: str) -> RankShare:
    """What the engine needs to size its state on one rank of pipeline stage ``stage``."""
    return RankShare(parameters=params.per_rank(layout)[stage], per_layer=params.layer_per_rank(layout),
                     layers=layers_per_stage(layout, config.model.num_layers)[stage], dp=layout.dp, cp=layout.cp,
                     param_bytes=dtype_bytes(config.train.precision), half=config.train.precision != "fp32",
                     device_type=device_type, experts=params.experts_per_rank(layout)[stage],
                     expert_dp=layout.expert_dp)


def planned_state(config: RunConfig, share: RankShare) -> PlannedState:
    """The engine's state for ``share``, plus what the run's precision adds."""
    state = engine_class(config.parallel.engine).plan_state(share, config.parallel, config.optim)
    if config.train.precision == "fp8" and config.fp8.backend == "te":
        # Transformer Engine keeps an fp8 copy of each weight and of its transpose
        state = replace(state, parameters=state.parameters + share.parameters * 2,
                        description=state.description + "; fp8 weight copies (TE)")
    return state


def estimate_memory(config: RunConfig, layout: ParallelLayout, vocab_size: int, device_type: str = "cuda",
                    capacity: int | None = None) -> MemoryEstimate:
    """Peak bytes per device of ``config`` on ``layout``: the worst pipeline stage."""
    m, train, kernels = config.model, config.train, config.kernels
    params = count_parameters(m, vocab_size, tp=layout.tp)
    stage_layers = layers_per_stage(layout, m.num_layers)
    dtype = dtype_bytes(train.precision)
    tokens = train.micro_batch_size * m.seq_len / layout.cp
    layer_bytes = layer_activation_bytes(config, layout, device_type)
    estimates = []
    for stage, layers in enumerate(stage_layers):
        state = planned_state(config, rank_share(config, layout, params, stage, device_type))
        notes = {"optimizer": state.description}
        activations = layer_bytes * in_flight_layer_microbatches(config, layout, stage, layers)
        if train.recompute == "full":
            activations += _recomputed_layer_bytes(config, layout, device_type)
            notes["activations"] = "full recomputation: each layer's input, plus one layer re-run in backward"
        else:
            notes["activations"] = f"{layer_bytes / tokens:,.0f} bytes per token per layer"
        output = 0.0
        if stage == layout.pp - 1:
            final_norm = tokens * (m.hidden_size * 2 * dtype + 4)
            local_vocab = params.padded_vocab / layout.tp
            if kernels.cross_entropy == "chunked":
                # one chunk of logits in fp32 (read from a parameter-dtype GEMM), and the output
                # layer's weight gradient, built chunk by chunk before it joins the gradient buffer
                rows = min(tokens, kernels.cross_entropy_chunk)
                logits = rows * local_vocab * (4 + (dtype if dtype != 4 else 0)) + local_vocab * m.hidden_size * dtype
            else:  # megatron-core keeps the logits and their fp32 softmax from the loss to its backward
                logits = tokens * local_vocab * (dtype + 4)
            output = final_norm + logits
        # The gradient reduction runs after backward has freed the activations: its copy counts
        # only where it outgrows them.
        buffers = state.buffers + max(0.0, state.reduction_copy - activations - output)
        items = {"parameters": int(state.parameters), "gradients": int(state.gradients),
                 "optimizer": int(state.optimizer), "activations": int(activations),
                 "output_and_loss": int(output), "buffers": int(buffers), "allocator_and_context": 0}
        if device_type == "cuda":
            items["allocator_and_context"] = int(ALLOCATOR_SLACK * sum(items.values()) + CUDA_CONTEXT_BYTES)
            notes["allocator_and_context"] = (f"{ALLOCATOR_SLACK:.0%} caching-allocator fragmentation + "
                                              f"{CUDA_CONTEXT_BYTES / GIB:.1f} GiB CUDA context and NCCL buffers")
        else:
            items["allocator_and_context"] = CPU_RUNTIME_BYTES
            notes["allocator_and_context"] = "the worker's interpreter and libraries (no caching allocator on CPU)"
        estimates.append(MemoryEstimate(stage=stage, items=items, capacity=capacity, notes=notes))
    return max(estimates, key=lambda e: e.total)


def _recomputed_layer_bytes(config: RunConfig, layout: ParallelLayout, device_type: str) -> float:
    """The activations of the one layer that backward re-runs under full recomputation."""
    unrecomputed = replace(config, train=replace(config.train, recompute="none"))
    return layer_activation_bytes(unrecomputed, layout, device_type)


def human_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"
