"""Build kiln's Llama-style megatron-core GPTModel for one rank of a parallel layout.

The model builder is the only place that knows how layers are split: it takes the layout
(through :class:`~kiln.parallel.backend.ParallelContext`) and a layer spec from
:mod:`kiln.kernels`, and returns this rank's model chunks (one, or ``virtual_pp`` when the
pipeline is interleaved).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kiln.config import Fp8Config, KernelsConfig, ModelConfig, ParallelConfig, TrainConfig
from kiln.kernels.attention import choose_backend
from kiln.kernels.fp8 import te_transformer_settings
from kiln.kernels.compile import compile_layers
from kiln.kernels.fusions import fusion_settings
from kiln.kernels.spec import (experts_run_grouped, initialize_tp_comm_overlap, select_block_spec,
                               uses_transformer_engine)
from kiln.model.init import init_weights
from kiln.model.moe import mark_expert_parameters, moe_transformer_settings
from kiln.parallel.backend import ParallelContext
from kiln.plan.params import count_parameters, human_exact, padded_vocab_size

log = logging.getLogger(__name__)


def _leave_uninitialised(tensor: torch.Tensor) -> None:
    pass


def transformer_config(m: ModelConfig, parallel: ParallelConfig, train: TrainConfig, ctx: ParallelContext,
                       fp8: Fp8Config | None = None, *, documents: bool = False):
    """megatron-core TransformerConfig for the run: RMSNorm, SwiGLU, no biases, no dropout.

    ``fp8``: the fp8 section when train.precision=fp8 (parameters stay bf16; see kiln.kernels.fp8).
    ``documents``: RoPE positions differ between samples, which the fused RoPE kernel does not take.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from kiln.engine import engine_class

    layout, precision, device_type = ctx.layout, train.param_precision, ctx.device.type
    transformer_engine = uses_transformer_engine(device_type, fp8)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # Stage-to-stage sends overlap compute only in the interleaved schedule, and only as
    # separate (not batched) isend/irecv calls.
    overlap_p2p = device_type == "cuda" and parallel.overlap_p2p_comm and layout.virtual_pp is not None
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.virtual_pp,
        context_parallel_size=layout.cp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # kiln initialises weights itself (layout-independent, see kiln.model.init); megatron
        # still runs its init path with a no-op method because that path tags each weight
        # with its TP partition dim and stride, which kiln's init reads.
        perform_initialization=True,
        init_method=_leave_uninitialised,
        output_layer_init_method=_leave_uninitialised,
        use_cpu_initialization=False,
        **fusion_settings(device_type, transformer_engine=transformer_engine,
                          main_grad=engine_class(parallel.engine).accumulates_main_grad, per_sample_rope=documents),
        **te_transformer_settings(fp8, transformer_engine=transformer_engine),
        **recompute_settings(train),
        **moe_transformer_settings(m, layout, grouped_gemm=experts_run_grouped(device_type, fp8, m.moe)),
        deallocate_pipeline_outputs=True,
        overlap_p2p_comm=overlap_p2p,
        batch_p2p_comm=not overlap_p2p,
        tp_comm_overlap=parallel.tp_comm_overlap,
    )


def recompute_settings(train: TrainConfig) -> dict[str, object]:
    """megatron-core's activation recomputation options for train.recompute."""
    if train.recompute == "none":
        return {}
    if train.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(train.recompute_modules))
    return dict(recompute_granularity="full", recompute_method=train.recompute_method,
                recompute_num_layers=train.recompute_num_layers)


def build_model(model_config: ModelConfig, parallel: ParallelConfig, train: TrainConfig, ctx: ParallelContext,
                vocab_size: int, *, kernels: KernelsConfig | None = None, fp8: Fp8Config | None = None,
                documents: bool = False) -> list[torch.nn.Module]:
    """This rank's model chunks, on its device, with weights initialised from train.seed.

    ``documents``: batches carry document maps (data.reset_attention_at_eos), so RoPE positions
    differ between the samples of a micro-batch.
    """
    from kiln.model.gpt import KilnGPTModel

    kernels = kernels or KernelsConfig()
    fp8 = (fp8 or Fp8Config()) if train.precision == "fp8" else None

    if parallel.tp_comm_overlap:
        initialize_tp_comm_overlap(model_config, train, ctx, fp8)
    tconfig = transformer_config(model_config, parallel, train, ctx, fp8, documents=documents)
    attention = choose_backend(kernels.attention, ctx.device.type, documents=documents, cp=ctx.layout.cp,
                               precision=train.precision)
    if ctx.rank == 0:
        log.info(f"kernels: attention {attention}" + (" (auto)" if kernels.attention == "auto" else "")
                 + (f", ring over cp={ctx.layout.cp}" if ctx.layout.cp > 1 and attention != "te" else "")
                 + (", document masks" if documents else ""))
    layout, coords = ctx.layout, ctx.coords
    chunks = layout.virtual_pp or 1
    padded = padded_vocab_size(vocab_size, model_config, layout.tp)
    models = []
    for vp_stage in range(chunks):
        model = KilnGPTModel(
            config=tconfig,
            transformer_layer_spec=select_block_spec(tconfig, ctx.device.type, attention, pp_rank=coords["pp"],
                                                     vp_stage=vp_stage if layout.virtual_pp else None, fp8=fp8,
                                                     moe=model_config.moe),
            vocab_size=padded,
            max_sequence_length=model_config.seq_len,
            pre_process=coords["pp"] == 0 and vp_stage == 0,
            post_process=coords["pp"] == layout.pp - 1 and vp_stage == chunks - 1,
            share_embeddings_and_output_weights=model_config.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model_config.rope_theta),
            pg_collection=ctx.pg_collection,
            vp_stage=vp_stage if layout.virtual_pp else None,
            cross_entropy=kernels.cross_entropy,
            cross_entropy_chunk=kernels.cross_entropy_chunk,
        )
        # All parameters in the training dtype, as megatron's Float16Module does: the local
        # spec's torch norms otherwise stay fp32, which the bf16 optimizer's checkpoint
        # mapping (fp32 master copies of bf16 params only) does not expect.
        model.to(device=ctx.device, dtype=tconfig.params_dtype)
        mark_expert_parameters(model)
        init_weights(model, model_config, ctx, seed=train.seed)
        models.append(model)
    if kernels.compile:
        compile_layers(models)
    if ctx.rank == 0:
        count = count_parameters(model_config, vocab_size, tp=layout.tp)
        fp8_note = f" ({fp8.backend} {fp8.recipe} GEMMs, bf16 parameters)" if fp8 else ""
        moe = model_config.moe
        moe_note = (f" ({human_exact(count.active)} active per token: {moe.top_k} of {moe.num_experts} experts"
                    f" in {len(count.moe_layer_ids)} MoE layers, "
                    + ("grouped GEMM" if tconfig.moe_grouped_gemm else "a GEMM per expert") + ")") if moe.enabled else ""
        log.info(f"model: {human_exact(count.total)} parameters{moe_note}, {len(models)} chunk(s) per rank, "
                 f"{train.precision}{fp8_note}")
    return models
