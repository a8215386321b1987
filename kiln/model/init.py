"""Weight initialisation that depends on neither the parallel layout nor the device.

megatron-core draws initial weights from a stream shared by all layers of a rank, so a model
split over two pipeline stages starts from different weights than the same model on one
rank. kiln instead gives every slice of every weight its own seed: slice ``i`` (along the
dimension tensor parallelism splits, dim 0 for weights it does not split) of the parameter
with global name ``n`` is drawn from ``hash(train.seed, n, i)``. Hence:

* the same seed gives the same model under any TP/PP/DP/CP layout (parity tests, and layout
  changes between runs, are meaningful);
* a rank draws only the slices of its own shard: at 70B and TP=8 that is 1/8 of each weight,
  not the whole tensor sliced afterwards;
* draws run on a CPU generator and are copied to the weight's device, so a CPU rehearsal and
  the GPU run start from the same weights (CUDA's generator gives other numbers).
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from kiln.config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# An MoE layer's experts: a loop of MLPs (local_experts.<i>.linear_fc1.weight) or TE's grouped
# GEMM (linear_fc1.weight<i>), <i> counting this rank's experts.
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12]\.weight)|(linear_fc[12]\.weight)(\d+))$")
# Output projections into the residual stream get the GPT-2/Megatron scaled init (experts' too).
_SCALED = ("self_attention.linear_proj.weight", "linear_fc2.weight")
_GATED = "linear_fc1.weight"  # SwiGLU's [gate; up]: the dense MLP's, every expert's, the shared experts'


def global_param_name(model: torch.nn.Module, local_name: str, first_local_expert: int = 0) -> str:
    """Map a chunk-local name to the layout-independent one (global layer index, global expert
    index of an expert parallel rank's ``first_local_expert``-based experts, tied output)."""
    match = _LAYER.match(local_name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}." + local_name[match.end():]
        expert = _LOCAL_EXPERT.search(name)
        if expert:
            index, weight = (expert.group(1), expert.group(2)) if expert.group(1) else (expert.group(4), expert.group(3))
            name = name[:expert.start()] + f".mlp.experts.local_experts.{first_local_expert + int(index)}.{weight}"
        return name
    if local_name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
        # The last stage's copy of a tied embedding must start equal to the first stage's.
        return "embedding.word_embeddings.weight"
    return local_name


_MASK64 = 2**64 - 1


def _slice_seed(base: int, index: int) -> int:
    """A well-mixed 63-bit seed for slice ``index`` (SplitMix64's finaliser)."""
    x = (base * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def _owned_slices(param: torch.Tensor, name: str, tp_rank: int, tp_size: int) -> tuple[int, torch.Tensor]:
    """(the dimension slices are taken along, the global indices of this rank's slices in order).

    The indices follow megatron-core's split of a (strided) TP weight: SwiGLU's fc1 holds
    [gate; up] on every rank, i.e. ``stride`` blocks, each split over TP.
    """
    if not getattr(param, "tensor_model_parallel", False):
        return 0, torch.arange(param.shape[0])
    dim = param.partition_dim
    # fc1's stride is 2 whatever the module reports (TE says 1).
    stride = 2 if name.endswith(_GATED) and ".mlp." in name else getattr(param, "partition_stride", 1)
    local = param.shape[dim]
    block, piece = local * tp_size // stride, local // stride
    return dim, torch.cat([torch.arange(b * block + tp_rank * piece, b * block + (tp_rank + 1) * piece)
                           for b in range(stride)])


def _draw(param: torch.Tensor, dim: int, indices: torch.Tensor, base_seed: int) -> torch.Tensor:
    """Standard-normal values of this rank's slices, on the CPU, laid out like ``param``."""
    slice_shape = [size for d, size in enumerate(param.shape) if d != dim]
    slices = torch.empty((len(indices), *slice_shape), dtype=torch.float32)
    generator = torch.Generator()  # CPU on purpose: the same numbers whatever device the weight is on
    for row, index in enumerate(indices.tolist()):
        generator.manual_seed(_slice_seed(base_seed, index))
        torch.randn(slice_shape, generator=generator, out=slices[row])
    return slices.movedim(0, dim)


@torch.no_grad()
def init_weights(model: torch.nn.Module, model_config: ModelConfig, ctx, seed: int) -> None:
    tp_rank, tp_size = ctx.coords["tp"], ctx.layout.tp
    experts = ctx.layout.expert_coords(ctx.rank)
    first_local_expert = experts["ep"] * (model_config.moe.num_experts // ctx.layout.ep)
    std = model_config.init_std
    scaled_std = std / math.sqrt(2.0 * model_config.num_layers)
    for local_name, param in model.named_parameters():
        if param.dim() == 1:  # RMSNorm gains
            param.fill_(1.0)
            continue
        name = global_param_name(model, local_name, first_local_expert)
        base_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        sigma = scaled_std if name.endswith(_SCALED) else std
        # Experts are split over the expert TP group (megatron-core marks their weights allreduce=False).
        expert = getattr(param, "allreduce", True) is False
        dim, indices = _owned_slices(param, name, *((experts["expert_tp"], ctx.layout.expert_tp) if expert
                                                   else (tp_rank, tp_size)))
        param.copy_((_draw(param, dim, indices, base_seed) * sigma).to(param.dtype))
