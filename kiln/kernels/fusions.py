"""Which of megatron-core's fused kernels a run uses, and why the others are off.

On GPUs every fusion that needs nothing beyond PyTorch is on: SwiGLU (``bias_activation_fusion``)
and the residual add (``bias_dropout_fusion``) through megatron-core's ``jit_fuser``
(torch.compile), and the vocab-parallel cross-entropy in one pass over the logits
(``cross_entropy_fusion_impl="native"``). RoPE fusion and gradient-accumulation fusion (the
weight gradient GEMM accumulates straight into megatron-core DDP's fp32 ``main_grad``) are
Transformer Engine kernels: on with TE, and the latter only for an engine whose gradients live
in ``main_grad``. On CPU all are off: inductor would compile every fused function on the first
step (tens of seconds on a laptop) to save nothing measurable. The softmax fusion stays off
everywhere: SDPA and TE's attention never materialise a softmax to fuse.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def fusion_settings(device_type: str, *, transformer_engine: bool, main_grad: bool,
                    per_sample_rope: bool = False) -> dict[str, object]:
    """TransformerConfig keyword arguments for the fused kernels of this run. ``per_sample_rope``:
    positions restart at documents, so RoPE angles are [s, b, 1, d], which TE's fused kernel refuses."""
    gpu = device_type == "cuda"
    te = gpu and transformer_engine
    settings = dict(
        bias_activation_fusion=gpu,
        bias_dropout_fusion=gpu,
        cross_entropy_loss_fusion=gpu,
        cross_entropy_fusion_impl="native",
        apply_rope_fusion=te and not per_sample_rope,
        gradient_accumulation_fusion=te and main_grad,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    on = [name for name, value in settings.items() if value is True]
    log.debug("kernels: fusions on: %s", ", ".join(on) or "none (CPU)")
    return settings
