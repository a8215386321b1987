"""fp8.backend=torchao: megatron-core's tensor-parallel linear layers with torchao's float8 GEMMs.

torchao's float8 training (``convert_to_float8_training``) swaps ``torch.nn.Linear`` modules, and
kiln's layers are megatron-core's ``ColumnParallelLinear``/``RowParallelLinear``, whose GEMM sits
inside megatron-core's own autograd function together with the tensor-parallel communication.
So kiln keeps megatron-core's layers (their weights, init, TP sharding, checkpoint keys, the
output-side all-reduce or reduce-scatter) and replaces only ``_forward_impl``, the one call that
does the input-side communication and the GEMM, by the same communication through megatron-core's
autograd-aware mappings, then torchao's float8 GEMM:

* sequence parallelism: all-gather the input over TP (backward: reduce-scatter its gradient);
* TP without it: the column layer's input gradient is all-reduced over TP in backward;
* the GEMM: ``input @ weight.T`` through a torchao ``Float8Linear`` that holds no weight of its
  own (built on the meta device by the public conversion API) and is called with the layer's
  weight (``torch.func.functional_call``), so it casts input, weight and output gradient to
  FP8 with scales from the current tensors (tensorwise: one per tensor; rowwise: one per row)
  and runs ``torch._scaled_mm`` forward and backward.

Dynamic scaling keeps no state: nothing goes into checkpoints, which stay those of a bf16 run.
Only the transformer layers' four GEMMs are swapped (the layer spec's linear_qkv, linear_proj,
linear_fc1, linear_fc2); the output layer (vocabulary projection) is built by GPTModel itself and
stays in bf16, as torchtitan keeps it. Weight gradients reach megatron-core DDP's ``main_grad``
through autograd (gradient-accumulation fusion, a TE kernel, is off on this spec), and the
input saved for backward is the gathered one under sequence parallelism (megatron-core's own
GEMM re-gathers it in backward instead).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel import layers, mappings


class Float8Matmul:
    """``input @ weight.T`` in FP8 through torchao, for a weight owned by another module.

    A plain object, not a submodule: the torchao module it wraps has only a meta-device weight,
    which must not show up among the layer's parameters or in its state dict.
    """

    def __init__(self, recipe: str) -> None:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        with torch.device("meta"):
            template = torch.nn.Linear(16, 16, bias=False)  # its shape is never used: the weight comes per call
        self.recipe = recipe
        self.linear = convert_to_float8_training(template, config=Float8LinearConfig.from_recipe_name(recipe))

    def __call__(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.linear, {"weight": weight}, (input,))


class _Float8Gemm:
    """What both float8 layers add to megatron-core's: the FP8 GEMM, and ``_forward_impl`` through it
    (megatron-core's ``linear_with_grad_accumulation_and_async_allreduce`` with the GEMM in FP8)."""

    def __init__(self, *args, recipe: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.float8_matmul = Float8Matmul(recipe)

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, **unused):
        if gradient_accumulation_fusion:  # off on this spec: a TE kernel would write main_grad past the FP8 GEMM
            raise RuntimeError("torchao float8 linear layers cannot fuse gradient accumulation")
        if sequence_parallel:
            input = mappings.gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True,
                                                                  group=tp_group)
        elif allreduce_dgrad:
            input = mappings.copy_to_tensor_model_parallel_region(input, group=tp_group)
        output = self.float8_matmul(input, weight)  # [s, b, out/tp]
        return output if bias is None else output + bias


class Float8ColumnParallelLinear(_Float8Gemm, layers.ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear with its GEMM in FP8 through torchao (see the module docstring)."""


class Float8RowParallelLinear(_Float8Gemm, layers.RowParallelLinear):
    """megatron-core's RowParallelLinear with its GEMM in FP8 through torchao (see the module docstring)."""


def use_float8_linears(layer_spec, recipe: str) -> None:
    """Swap the four GEMMs of a local-spec transformer layer (in place) for torchao float8 ones."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    column = ModuleSpec(module=Float8ColumnParallelLinear, params={"recipe": recipe})
    row = ModuleSpec(module=Float8RowParallelLinear, params={"recipe": recipe})
    attention = layer_spec.submodules.self_attention.submodules
    mlp_spec = layer_spec.submodules.mlp
    # megatron-core 0.19 builds the MLP through a partial of MLP.as_mlp_submodule, 0.16 a ModuleSpec.
    mlp = mlp_spec.keywords["submodules"] if isinstance(mlp_spec, functools.partial) else mlp_spec.submodules
    attention.linear_qkv, attention.linear_proj = column, row
    mlp.linear_fc1, mlp.linear_fc2 = column, row
