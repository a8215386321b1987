"""The one place that chooses kernels: Transformer Engine layer spec, or megatron-core's local one.

TE's spec (fused RMSNorm+linear, FP8-capable GEMMs) is used when TE imports and a GPU is
present; everywhere else the local spec runs the same architecture in plain PyTorch, with
kiln's RMSNorm (kiln.kernels.norm, which, unlike megatron-core's torch norm, works with
sequence parallelism). The fallback is announced once, never silent. In both, core attention
is kiln's (kiln.kernels.attention) on the run's attention backend.

Both specs save the same checkpoint keys: the local spec maps its norms onto TE's fused
names (megatron-core's ``sharded_state_dict_keys_map``), so a CPU rehearsal's checkpoint
continues on a GPU cluster and back (TE's extra FP8 state is handled at load). FP8 through
torchao (kiln.kernels.float8_linear) runs on the local spec, with its four GEMMs swapped.
"""

from __future__ import annotations

import functools
import importlib
import logging

from kiln.config import Fp8Config

log = logging.getLogger(__name__)

# What megatron-core itself imports before it offers the TE spec (megatron.core.extensions.
# transformer_engine): the package, its PyTorch half, and the FP8 state manager in it.
_TE_MODULES = ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.fp8")


@functools.cache
def transformer_engine_missing() -> str | None:
    """None when megatron-core can use Transformer Engine here; else which part is missing and why."""
    for module in _TE_MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:  # ImportError, or a TE build that does not match this torch/CUDA
            return f"{module} does not import ({type(error).__name__}: {error})"
    from megatron.core.extensions import transformer_engine as mcore_te

    if not getattr(mcore_te, "HAVE_TE", False):
        return "megatron-core's Transformer Engine extension did not load TE"
    return None


def uses_transformer_engine(device_type: str, fp8: Fp8Config | None = None) -> bool:
    """Whether the TE layer spec runs: on a GPU with TE, unless ``fp8`` (the run's fp8 section when
    train.precision=fp8) asks for torchao, whose GEMMs go into the local spec's linear layers."""
    torchao_fp8 = fp8 is not None and fp8.backend == "torchao"
    return device_type == "cuda" and transformer_engine_missing() is None and not torchao_fp8


def select_layer_spec(device_type: str, attention_backend: str, fp8: Fp8Config | None = None, *,
                      num_experts: int | None = None, grouped_gemm: bool = False):
    """megatron-core ModuleSpec of one transformer layer for this device (and FP8 backend).

    ``num_experts``: an MoE layer (router, token dispatcher, experts; shared experts when the
    config asks); ``grouped_gemm`` runs its experts as TE's grouped GEMM (TE spec only).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    from kiln.kernels.attention import core_attention_spec

    if uses_transformer_engine(device_type, fp8):
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts,
                                                                          moe_grouped_gemm=grouped_gemm)
        spec.submodules.self_attention.submodules.core_attention = core_attention_spec(attention_backend)
        return spec
    from kiln.kernels.norm import RMSNorm

    # The local spec's experts are a loop of per-expert GEMMs (megatron-core's SequentialMLP):
    # its grouped alternative needs the grouped_gemm CUDA package.
    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                    normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = core_attention_spec(attention_backend)
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if num_experts:
        # TE fuses the pre-MLP norm into a dense layer's fc1 only; an MoE layer keeps it apart
        # (pre_mlp_layernorm.weight), and so must the local spec's checkpoint keys.
        spec.submodules.sharded_state_dict_keys_map = {
            key: value for key, value in spec.submodules.sharded_state_dict_keys_map.items()
            if key != "pre_mlp_layernorm."}
    if fp8 is not None and fp8.backend == "torchao":
        from kiln.kernels.float8_linear import use_float8_linears

        use_float8_linears(spec, fp8.recipe)
    return spec


def log_layer_spec(device_type: str, fp8: Fp8Config | None = None) -> None:
    """Say once which layer spec runs, and why the local one when it does."""
    if uses_transformer_engine(device_type, fp8):
        log.info("kernels: Transformer Engine layer spec")
        return
    if fp8 is not None and fp8.backend == "torchao":
        reason = f"torchao float8 {fp8.recipe} GEMMs in its linear layers"
    elif device_type != "cuda":
        reason = "no GPU"
    else:
        reason = f"Transformer Engine unusable: {transformer_engine_missing()}; pip install 'kiln[gpu]'"
    log.info("kernels: megatron-core local layer spec (%s)", reason)


def experts_run_grouped(device_type: str, fp8: Fp8Config | None, moe) -> bool:
    """Whether an MoE layer's experts run as one grouped GEMM (TE) rather than a loop of GEMMs."""
    return moe.grouped_gemm and uses_transformer_engine(device_type, fp8)


def select_block_spec(tconfig, device_type: str, attention_backend: str, *, vp_stage: int | None, pp_rank: int,
                      fp8: Fp8Config | None = None, moe=None):
    """The decoder block of one model chunk: its layers' specs and its final norm.

    Built here rather than left to megatron-core, which gives a bare layer spec the torch norm
    as final norm when TE is absent (and that norm refuses sequence parallelism). ``moe``
    (model.moe, when enabled) makes the layers it names MoE layers, by global layer index.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    log_layer_spec(device_type, fp8)
    layer = select_layer_spec(device_type, attention_backend, fp8)
    te = uses_transformer_engine(device_type, fp8)
    if te and (moe is None or not moe.enabled):
        return layer
    layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    specs = [layer] * layers
    if moe is not None and moe.enabled:
        moe_layer = select_layer_spec(device_type, attention_backend, fp8, num_experts=moe.num_experts,
                                      grouped_gemm=experts_run_grouped(device_type, fp8, moe))
        offset = get_transformer_layer_offset(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
        specs = [moe_layer if moe.is_moe_layer(offset + index) else layer for index in range(layers)]
    if te:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        from kiln.kernels.norm import RMSNorm as final_norm
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)


def initialize_tp_comm_overlap(model_config, train_config, ctx, fp8: Fp8Config | None = None) -> None:
    """Transformer Engine's userbuffers for overlapping TP communication with the GEMMs.

    Sized as Megatron-LM sizes them: one sequence-parallel activation of a micro-batch,
    [seq_len × micro_batch / cp, hidden]; FP8 ones when TE runs the GEMMs in FP8. Must run
    before the model is built.
    """
    from kiln.errors import KilnEnvironmentError

    if not uses_transformer_engine(ctx.device.type):
        why = "no GPU" if ctx.device.type != "cuda" else transformer_engine_missing()
        raise KilnEnvironmentError(f"parallel.tp_comm_overlap needs Transformer Engine on GPUs ({why}); "
                                   "set parallel.tp_comm_overlap=false")
    from transformer_engine.pytorch import module as te_module

    shape = [model_config.seq_len * train_config.micro_batch_size // ctx.layout.cp, model_config.hidden_size]
    te_module.base.initialize_ub(shape=shape, tp_size=ctx.layout.tp, use_fp8=fp8 is not None and fp8.backend == "te",
                                 bootstrap_backend="nccl")
    log.info("kernels: TP communication overlapped with GEMMs (TE userbuffers, %s)", shape)
