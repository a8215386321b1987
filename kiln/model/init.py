"""Weight initialisation that does not depend on the parallel layout.

megatron-core draws initial weights from a stream shared by all layers of a rank, so a model
split over two pipeline stages starts from different weights than the same model on one
rank. kiln instead seeds every parameter from ``(train.seed, its global name)``, draws the
*full* (unsharded) tensor, and keeps this rank's shard. The same seed therefore gives the
same model under any TP/PP/DP/CP layout, which is what makes parity tests and layout changes
between runs meaningful.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from kiln.config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# Output projections into the residual stream get the GPT-2/Megatron scaled init.
_SCALED = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_GATED = "mlp.linear_fc1.weight"


def global_param_name(model: torch.nn.Module, local_name: str) -> str:
    """Map a chunk-local name to the layout-independent one (global layer index, tied output)."""
    match = _LAYER.match(local_name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        return f"decoder.layers.{layer.layer_number - 1}." + local_name[match.end():]
    if local_name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
        # The last stage's copy of a tied embedding must start equal to the first stage's.
        return "embedding.word_embeddings.weight"
    return local_name


def _shard(full: torch.Tensor, param: torch.Tensor, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's piece of ``full``, the way megatron-core splits a (strided) TP weight."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    # SwiGLU's fc1 holds [gate; up] per rank whatever stride the module reports (TE says 1).
    stride = 2 if name.endswith(_GATED) else getattr(param, "partition_stride", 1)
    # A strided weight (SwiGLU fc1: [gate; up]) is `stride` blocks, each split over TP.
    blocks = torch.chunk(full, stride, dim=dim)
    return torch.cat([torch.chunk(block, tp_size, dim=dim)[tp_rank] for block in blocks], dim=dim)


@torch.no_grad()
def init_weights(model: torch.nn.Module, model_config: ModelConfig, ctx, seed: int) -> None:
    tp_rank, tp_size = ctx.coords["tp"], ctx.layout.tp
    std = model_config.init_std
    scaled_std = std / math.sqrt(2.0 * model_config.num_layers)
    for local_name, param in model.named_parameters():
        if param.dim() == 1:  # RMSNorm gains
            param.fill_(1.0)
            continue
        name = global_param_name(model, local_name)
        full_shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            full_shape[param.partition_dim] *= tp_size
        generator = torch.Generator(device=param.device)
        generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        sigma = scaled_std if name.endswith(_SCALED) else std
        full = torch.randn(full_shape, generator=generator, device=param.device, dtype=torch.float32) * sigma
        param.copy_(_shard(full, param, name, tp_rank, tp_size).to(param.dtype))
