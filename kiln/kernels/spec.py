"""The one place that chooses kernels: Transformer Engine layer spec, or megatron-core's local one.

TE's spec (fused RMSNorm+linear, FlashAttention/cuDNN attention, FP8-capable GEMMs) is used
when TE imports and a GPU is present; everywhere else the local spec runs the same
architecture in plain PyTorch, with attention through PyTorch SDPA (kiln.kernels.attention).
The fallback is announced once, never silent.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match this torch/CUDA
        return False
    return True


def select_layer_spec(device_type: str):
    """megatron-core ModuleSpec of one transformer layer for this device."""
    from megatron.core.models.gpt import gpt_layer_specs

    if device_type == "cuda" and transformer_engine_available():
        log.info("kernels: Transformer Engine layer spec")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from kiln.kernels.attention import SDPAttention

    reason = "no GPU" if device_type != "cuda" else "transformer-engine is not installed (pip install 'kiln[gpu]')"
    log.info("kernels: megatron-core local layer spec with PyTorch SDPA attention (%s)", reason)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
