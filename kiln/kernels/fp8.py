"""train.precision=fp8: whether a config and a machine can run it, and the settings that turn it on.

Two backends (the ``fp8:`` section), both with bf16 parameters, fp32 optimizer masters and bf16
for everything outside the transformer layers' GEMMs (the output layer included):

* ``te``: Transformer Engine's linear layers (the TE layer spec) under TE's FP8 autocast, which
  megatron-core's TransformerBlock enters itself when ``TransformerConfig.fp8`` is set
  (``megatron.core.fp8_utils.get_fp8_context``: around the whole block for delayed scaling,
  around each layer for the other recipes), reducing amaxes over the ranks of one pipeline
  stage (megatron-core's amax reduction group, dp × tp × cp). Delayed scaling keeps an amax
  history and scales per tensor in each TE module's ``_extra_state``; megatron-core's sharded
  state dict saves it, and a resume restores it (:func:`trusted_te_extra_state`). tensorwise
  (current scaling) and mxfp8 (32-element block scales, Blackwell) keep no state.
* ``torchao``: torchao's float8 GEMMs in megatron-core's own linear layers on the local spec
  (:mod:`kiln.kernels.float8_linear`); tensorwise or rowwise dynamic scaling, no state.

Nothing falls back: a run that asks for FP8 and cannot have it stops before any process starts
(:func:`check_fp8_config` when the config is read, :func:`check_fp8_environment` before launch).
"""

from __future__ import annotations

import contextlib
import os

from kiln.config import Fp8Config, ModelConfig, ParallelConfig, TrainConfig
from kiln.errors import KilnConfigError, KilnEnvironmentError

FP8_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0, Blackwell 10.x and 12.x
MXFP8_CAPABILITY = (10, 0)
GEMM_MULTIPLE = 16  # FP8 GEMMs (cuBLASLt, TE and torch._scaled_mm) want every dimension a multiple of 16
# Transformer Engine versions that megatron-core asks for each recipe (megatron.core.fp8_utils.get_fp8_recipe).
TE_MIN_VERSION = {"tensorwise": "2.2.0.dev0", "mxfp8": "2.1.0", "delayed": "1.0"}
TORCHAO_INSTALL = "pip install 'kiln[fp8]' (torchao>=0.10)"
# TE 2.18+ unpickles a delayed-scaling _extra_state only with this set (see trusted_te_extra_state).
TE_PICKLE_OPT_IN = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


# -- when the config is read ----------------------------------------------------------------------
def check_fp8_config(fp8: Fp8Config, *, model: ModelConfig, parallel: ParallelConfig, train: TrainConfig) -> None:
    """Raise KilnConfigError for an FP8 setup no machine can run (train.precision=fp8)."""
    from kiln.engine import engine_class

    engine = engine_class(parallel.engine)
    if fp8.backend not in engine.fp8_backends:
        raise KilnConfigError(
            f"fp8.backend={fp8.backend} needs parallel.engine=megatron: Transformer Engine re-casts its FP8 weights "
            "only on the micro-batch megatron-core's schedules mark as a step's first, and the "
            f"{parallel.engine} engine's own loop marks none (it would train on stale FP8 weights); use "
            f"parallel.engine=megatron, or fp8.backend=torchao (stateless, any engine)")
    if fp8.backend == "torchao" and parallel.tp_comm_overlap:
        raise KilnConfigError("parallel.tp_comm_overlap overlaps Transformer Engine's GEMMs with TP communication; "
                              "fp8.backend=torchao runs megatron-core's own linear layers: set "
                              "parallel.tp_comm_overlap=false, or use fp8.backend=te")
    recomputed = sorted({"layernorm", "moe_act"} & set(train.recompute_modules))
    if fp8.recipe == "delayed" and train.recompute == "selective" and recomputed:
        raise KilnConfigError(f"train.recompute_modules recomputes {', '.join(recomputed)}, which megatron-core does "
                              "not support with fp8.recipe=delayed; use fp8.recipe=tensorwise or drop "
                              f"{', '.join(recomputed)} from train.recompute_modules")
    odd = [f"{what} = {value}" for what, value in gemm_dimensions(model, parallel, train) if value % GEMM_MULTIPLE]
    if odd:
        raise KilnConfigError(f"train.precision=fp8: FP8 GEMMs need every dimension a multiple of {GEMM_MULTIPLE}, "
                              f"and here {'; '.join(odd)}; change the model sizes (or parallel.tp, "
                              "train.micro_batch_size), or use train.precision=bf16")


def gemm_dimensions(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig) -> list[tuple[str, int]]:
    """(how it is computed, value) of every dimension of a transformer layer's GEMMs on one rank."""
    tp, d = parallel.tp, model.head_dim
    heads, groups = model.num_attention_heads, model.query_groups
    return [
        (f"model.hidden_size({model.hidden_size})", model.hidden_size),
        (f"the attention's q,k,v columns per rank, (num_attention_heads({heads}) + 2 × query groups({groups})) × "
         f"head dim({d}) / parallel.tp({tp})", (heads + 2 * groups) * d // tp),
        (f"the attention output's rows per rank, num_attention_heads({heads}) × head dim({d}) / parallel.tp({tp})",
         heads * d // tp),
        (f"the MLP's width per rank, ffn_hidden_size({model.ffn_size}) / parallel.tp({tp})", model.ffn_size // tp),
        (f"tokens per micro-batch, model.seq_len({model.seq_len}) × train.micro_batch_size({train.micro_batch_size})"
         f" / parallel.cp({parallel.cp})", model.seq_len * train.micro_batch_size // parallel.cp),
    ]


# -- before launch --------------------------------------------------------------------------------
def check_fp8_environment(fp8: Fp8Config, device_type: str) -> None:
    """Raise KilnEnvironmentError when this machine cannot run the FP8 the config asks for."""
    import torch

    needs = ("train.precision=fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability "
             f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}+: Ada, Hopper, Blackwell)")
    if device_type != "cuda":
        raise KilnEnvironmentError(f"{needs}; this run is on CPU; use train.precision=bf16")
    capability, name = tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name()
    where = f"{name} (compute capability {capability[0]}.{capability[1]})"
    if capability < FP8_CAPABILITY:
        raise KilnEnvironmentError(f"{needs}; this GPU is {where}; use train.precision=bf16")
    if fp8.recipe == "mxfp8" and capability < MXFP8_CAPABILITY:
        raise KilnEnvironmentError(
            f"fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability {MXFP8_CAPABILITY[0]}.{MXFP8_CAPABILITY[1]}+)"
            f" for its block-scaled FP8 GEMMs; this GPU is {where}; use fp8.recipe=tensorwise or delayed")
    missing = transformer_engine_fp8_missing(fp8.recipe) if fp8.backend == "te" else torchao_missing()
    if missing is not None:
        raise KilnEnvironmentError(missing)


def transformer_engine_fp8_missing(recipe: str) -> str | None:
    """Why Transformer Engine cannot run this recipe here, with the fix; None when it can."""
    from kiln.kernels.spec import transformer_engine_missing

    missing = transformer_engine_missing()
    if missing is not None:
        return (f"fp8.backend=te needs Transformer Engine: {missing}; pip install 'kiln[gpu]' (TE builds from "
                f"source on a CUDA machine), or use fp8.backend=torchao ({TORCHAO_INSTALL})")
    from megatron.core.utils import get_te_version, is_te_min_version

    if not is_te_min_version(TE_MIN_VERSION[recipe]):
        return (f"fp8.recipe={recipe} needs Transformer Engine {TE_MIN_VERSION[recipe].removesuffix('.dev0')} or "
                f"newer (megatron-core builds its recipe from it); this is {get_te_version()}; upgrade "
                "transformer-engine or use fp8.recipe=delayed")
    return None


def torchao_missing() -> str | None:
    """Why torchao's float8 training is unusable here, with the fix; None when it is usable."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: F401
    except Exception as error:  # ImportError, or a torchao build that does not match this torch
        return (f"fp8.backend=torchao needs torchao's float8 training: torchao.float8 does not import "
                f"({type(error).__name__}: {error}); {TORCHAO_INSTALL}, or use fp8.backend=te")
    if not hasattr(Float8LinearConfig, "from_recipe_name"):
        return ("fp8.backend=torchao needs torchao 0.10 or newer (Float8LinearConfig.from_recipe_name); "
                f"{TORCHAO_INSTALL}")
    return None


# -- building the model ---------------------------------------------------------------------------
def te_transformer_settings(fp8: Fp8Config | None, *, transformer_engine: bool) -> dict[str, object]:
    """megatron-core TransformerConfig keyword arguments for TE's FP8 (none for torchao or without FP8).

    hybrid: e4m3 forward (activations, weights), e5m2 for the output gradients, which need the
    range more than the precision; mxfp8 scales every 32 elements, so e4m3 serves throughout.
    """
    if fp8 is None or fp8.backend != "te":
        return {}
    if not transformer_engine:  # never a bf16 run that was asked to be FP8
        raise KilnEnvironmentError(transformer_engine_fp8_missing(fp8.recipe) or
                                   "fp8.backend=te needs the Transformer Engine layer spec, which runs on GPUs only; "
                                   "use train.precision=bf16 here")
    settings: dict[str, object] = dict(fp8="e4m3" if fp8.recipe == "mxfp8" else "hybrid", fp8_recipe=fp8.recipe)
    if fp8.recipe == "delayed":
        settings.update(fp8_amax_history_len=fp8.amax_history_len, fp8_amax_compute_algo=fp8.amax_compute_algo)
    return settings


@contextlib.contextmanager
def trusted_te_extra_state():
    """Let Transformer Engine unpickle the delayed-scaling state (amax history, scales) of a checkpoint.

    TE 2.18+ refuses to unpickle a delayed-scaling ``_extra_state`` (a pickle can run code) unless
    ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1``, which would leave a resumed FP8 run unable to load its
    own checkpoint. The checkpoints kiln loads are its run's own or the one checkpoint.resume_from
    names, checked against their manifest, and kiln unpickles its RNG states from the same files:
    the trust is already given, so a load allows it, for the load's duration only.
    """
    previous = os.environ.get(TE_PICKLE_OPT_IN)
    os.environ[TE_PICKLE_OPT_IN] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TE_PICKLE_OPT_IN, None)
        else:
            os.environ[TE_PICKLE_OPT_IN] = previous
