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

from dataclasses import dataclass, field

from kiln.config import RunConfig
from kiln.parallel.layout import ParallelLayout
from kiln.plan.params import ParamCount, count_parameters

GB = 1e9  # the ZeRO paper's unit
GIB = 2**30
CUDA_CONTEXT_BYTES = int(1.0 * GIB)  # CUDA context, cuBLAS workspaces, NCCL channel buffers (outside torch's allocator)
CPU_RUNTIME_BYTES = int(1.0 * GIB)  # a CPU worker's interpreter and libraries (torch, megatron-core, DeepSpeed)  # CUDA context, cuBLAS workspaces, NCCL channel buffers (outside torch's allocator)
ALLOCATOR_SLACK = 0.08  # the caching allocator's fragmentation: reserved exceeds allocated by this fraction
DEEPSPEED_REDUCE_BUCKET = 50_000_000  # elements: kiln.engine.deepspeed's reduce_bucket_size
DEEPSPEED_MAX_REUSE_DISTANCE = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance default
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


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2  # fp8 runs keep bf16 weights and activations between GEMMs


def _uses_te(device_type: str) -> bool:
    """GPU runs use Transformer Engine's layer spec (the gpu extra installs it), CPU runs the local one."""
    return device_type == "cuda"


def layer_activation_bytes(config: RunConfig, layout: ParallelLayout, device_type: str) -> float:
    """Bytes autograd keeps for one transformer layer and one micro-batch on one rank."""
    m, p, train = config.model, config.parallel, config.train
    tokens = train.micro_batch_size * m.seq_len / layout.cp
    h, f, a, g, d = m.hidden_size, m.ffn_size, m.num_attention_heads, m.query_groups, m.head_dim
    t = layout.tp
    dtype = _dtype_bytes(train.precision)
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


def _model_states(config: RunConfig, n: int, layout: ParallelLayout, params: ParamCount, layers: int
                  ) -> tuple[dict[str, float], dict[str, str]]:
    """Parameter, gradient, optimizer and parameter-gathering bytes of the ``n`` parameters of a rank
    holding ``layers`` transformer layers."""
    p, train, optim = config.parallel, config.train, config.optim
    half = train.precision != "fp32"
    pb = _dtype_bytes(train.precision)
    dp = layout.dp
    if p.engine == "megatron":
        shards = layout.dp * layout.cp if optim.distributed_optimizer else 1
        master = 4 if half else 0  # fp32 runs step the weights themselves (the distributed optimizer: views)
        states = {"parameters": n * pb, "gradients": n * 4, "optimizer": n * (8 + master) / shards, "gathered": 0.0}
        how = (f"megatron-core DDP: {pb}-byte weights, fp32 gradient buffer; Adam "
               + (f"(fp32 masters + 2 moments) over dp×cp = {shards} (distributed optimizer)" if shards > 1
                  else f"{8 + master} bytes per parameter"))
    elif p.engine == "deepspeed":
        stage = p.zero_stage
        weights, _, optimizer = zero_model_state_bytes(n, dp, stage, k=ZERO_K, param_bytes=pb)
        grads = n * 4 / (dp if stage >= 2 else 1)  # ZeRO reduces and keeps gradients in fp32
        if p.offload_optimizer != "none":
            optimizer = 0.0
        if p.offload_params != "none":
            weights = 0.0
        layer = (params.per_layer - params.per_layer_norms) / layout.tp + params.per_layer_norms
        # ZeRO-3 releases a gathered parameter only when its next use is further than
        # stage3_max_reuse_distance (DeepSpeed's default, 1e9 parameters) away: below that, backward's
        # reuse keeps every gathered parameter of a forward alive until backward.
        gathered = (n if n <= DEEPSPEED_MAX_REUSE_DISTANCE else 2 * layer) * pb if stage == 3 else 0.0
        states = {"parameters": weights, "gradients": grads, "optimizer": optimizer, "gathered": gathered}
        how = f"DeepSpeed ZeRO-{stage} over dp = {dp} (K = {ZERO_K}, fp32 gradients)"
    else:  # fsdp: fp32 shards are the master weights; compute-dtype copies are gathered per unit
        # The root unit (embedding, final norm, output layer) stays gathered from forward to backward,
        # and its unsharded gradient (computed in the parameter dtype, reduced in fp32) exists at once;
        # each layer is gathered while it runs (two at a time with prefetching), or all of them from
        # forward to backward with reshard_after_forward=false.
        layer = (params.per_layer - params.per_layer_norms) / layout.tp + params.per_layer_norms
        root = n - layer * layers
        gathered_layers = layers if not p.reshard_after_forward else min(2, layers)
        gathered = (root + layer * gathered_layers) * pb + root * (pb + 4)
        states = {"parameters": n * 4 / dp, "gradients": n * 4 / dp, "optimizer": n * 8 / dp, "gathered": gathered}
        if p.offload_params != "none":
            states.update(parameters=0.0, gradients=0.0, optimizer=0.0)
        how = f"FSDP2 over dp = {dp}: fp32 shards, Adam moments sharded, units gathered in {pb} bytes"
    if train.precision == "fp8" and config.fp8.backend == "te":
        states["parameters"] += n * 2  # Transformer Engine's fp8 copies of each weight and of its transpose
        how += "; fp8 weight copies (TE)"
    return states, {"model_states": how}


def estimate_memory(config: RunConfig, layout: ParallelLayout, vocab_size: int, device_type: str = "cuda",
                    capacity: int | None = None) -> MemoryEstimate:
    """Peak bytes per device of ``config`` on ``layout``: the worst pipeline stage."""
    m, train, p, kernels = config.model, config.train, config.parallel, config.kernels
    params = count_parameters(m, vocab_size, tp=layout.tp)
    per_rank = params.per_rank(layout)
    stage_layers = [sum(end - start for start, end in chunks) for chunks in layout.stage_layers(m.num_layers)]
    dtype = _dtype_bytes(train.precision)
    tokens = train.micro_batch_size * m.seq_len / layout.cp
    layer_bytes = layer_activation_bytes(config, layout, device_type)
    estimates = []
    for stage, (n, layers) in enumerate(zip(per_rank, stage_layers)):
        states, notes = _model_states(config, n, layout, params, layers)
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
        buffers = states.pop("gathered")
        # The gradient reduction runs after backward has freed the activations: its copy counts
        # only where it outgrows them.
        reduction = _gloo_reduce_scatter_copy(config, layout, n, params, layers, device_type)
        buffers += max(0.0, reduction - activations - output)
        if p.engine == "deepspeed":
            # ZeRO's contiguous gradient bucket: reduce_bucket_size elements, however small the model
            buffers += DEEPSPEED_REDUCE_BUCKET * dtype
        items = {"parameters": int(states["parameters"]), "gradients": int(states["gradients"]),
                 "optimizer": int(states["optimizer"]), "activations": int(activations),
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


def _gloo_reduce_scatter_copy(config: RunConfig, layout: ParallelLayout, n: int, params: ParamCount, layers: int,
                              device_type: str) -> float:
    """gloo has no reduce-scatter of its own: torch all-reduces a copy of the whole input. On CPU that
    copy is the fp32 gradient buffer (megatron's distributed optimizer, unbucketed on CPU) or the
    largest FSDP unit's gradients (the root: embedding and output layer)."""
    if device_type != "cpu" or layout.dp * layout.cp == 1:
        return 0.0
    if config.parallel.engine == "megatron" and config.optim.distributed_optimizer:
        return n * 4.0
    if config.parallel.engine == "fsdp":
        layer = (params.per_layer - params.per_layer_norms) / layout.tp + params.per_layer_norms
        return max(n - layer * layers, layer) * 4.0
    return 0.0


def _recomputed_layer_bytes(config: RunConfig, layout: ParallelLayout, device_type: str) -> float:
    """The activations of the one layer that backward re-runs under full recomputation."""
    import dataclasses

    unrecomputed = dataclasses.replace(config, train=dataclasses.replace(config.train, recompute="none"))
    return layer_activation_bytes(unrecomputed, layout, device_type)


def human_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"
