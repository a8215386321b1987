"""``kernels.compile``: regional torch.compile, one compiled graph shared by every transformer layer.

Why per layer rather than the whole model: every layer runs the same code on tensors of the same
shapes, and dynamo caches graphs per code object, with guards on shapes, dtypes and the attributes a
layer reads, not on which module it is (parameters are graph inputs: ``inline_inbuilt_nn_modules``).
The first layer's call traces and compiles; the other layers, on every pipeline chunk, reuse its
graph. Compile time is one layer's whatever the depth; the embedding, the output layer and the loss
stay eager (kiln's chunked loss and the pipeline schedules are not worth a graph).

In place: each layer's ``forward`` becomes a compiled one on the instance, so the module tree,
parameter names and (sharded) state-dict keys are the eager model's, and checkpoints move between
compiled and eager runs. The forward rather than the whole call (``nn.Module.compile`` compiles
``_call_impl``) so the hooks an engine puts around a layer (FSDP2's unshard before and reshard after
each unit) run eagerly around the graph instead of breaking it.

The options, and why:

* ``fullgraph=True``: a graph break would split a layer into graphs with Python between them, a
  slowdown nothing reports (with TP=2 on CPU, graph breaks at the TP collectives made steps slower
  than eager). Instead it is an error at the first call, which the fallback below turns into eager
  layers and one warning.
* ``dynamic=False``: a run feeds every layer one shape ([seq/cp, micro-batch, hidden]), so static
  shapes give the best kernels and no symbolic-shape compile.
* ``recompile_limit`` (:data:`RECOMPILE_LIMIT`), counted for the region, not per layer: the graphs a
  run can need (train / eval, with and without gradients for full recompute's first pass, RoPE
  shared or per sample) fit; more means something differs between layers and each one would compile
  on its own, so with ``fullgraph`` dynamo raises and the fallback reports it.
* The backward is compiled with the forward (functorch's ``force_non_lazy_backward_lowering``), so
  a backward that fails to compile does so inside the guarded forward call, not in the middle of
  autograd where nothing can fall back.
* ``warnings.warn`` in traced code is dropped (dynamo's ``ignore_logging_functions``):
  megatron-core 0.16's RowParallelLinear warns on every call that it was given no TP group, and
  dynamo cannot trace a warning. A compiled graph never runs Python anyway; the same warning still
  comes from the eager layers outside the region.

The last two are process-wide torch settings, set only when ``kernels.compile`` is on. Settings
that cannot compose with compiled layers are config errors (:meth:`kiln.config.RunConfig`).

Fallback: where compiling fails (an unsupported platform, a backend that cannot build, something
in a layer dynamo cannot trace), the failing call reruns eagerly, every layer of the rank stays
eager from then on, and one warning says why. A failed trace runs nothing, so the rerun computes
exactly what the eager model would.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 8


def compile_layers(models: list[torch.nn.Module], *, backend: str | Callable = "inductor") -> CompiledLayers:
    """Compile the transformer layers of this rank's model chunks in place (see the module docstring)."""
    layers = [layer for model in models for layer in model.decoder.layers]
    return CompiledLayers(layers, backend=backend)


class CompiledLayers:
    """A rank's transformer layers sharing one compiled graph; all of them eager again after a compile error."""

    def __init__(self, layers: list[torch.nn.Module], *, backend: str | Callable = "inductor") -> None:
        from kiln.kernels.spec import uses_transformer_engine

        self.layers = layers
        self.graphs = 0
        """Graphs compiled for the layers so far (one per grad mode, train/eval or shape, not per layer)."""
        self.compile_seconds = 0.0
        """Wall time of the calls that compiled: tracing, forward and backward compile."""
        self.fallback: str | None = None
        """Why the layers run eagerly (None while compiled)."""
        self._switched: list[torch.nn.Module] = []
        if not layers:  # a pipeline stage without transformer layers
            return
        device = next(p.device for layer in layers for p in layer.parameters())
        if uses_transformer_engine(device.type):
            self.fall_back("Transformer Engine's layers opt out of torch.compile (their forwards are "
                           "no_torch_dynamo) and run fused kernels already")
            return
        self._switched = _synchronous_dgrad_all_reduce(layers)
        try:
            _configure_dynamo()
            compiled = [torch.compile(layer.forward, backend=backend, fullgraph=True, dynamic=False,
                                      recompile_limit=RECOMPILE_LIMIT) for layer in layers]
        except Exception as error:  # torch.compile refuses this platform or Python up front
            self.fall_back(error)
            return
        for layer, forward in zip(layers, compiled):
            layer.forward = _GuardedForward(self, layer.forward, forward)
        log.info(f"kernels: {len(layers)} transformer layers compile at the first step (torch.compile, {backend})")

    def fall_back(self, error: BaseException | str) -> None:
        """Every layer eager from now on; says why once."""
        if self.fallback is not None:
            return
        self.fallback = error if isinstance(error, str) else _reason(error)
        for linear in self._switched:  # eager: the overlapped all-reduce again
            linear.allreduce_dgrad = True
        for layer in self.layers:
            if isinstance(layer.__dict__.get("forward"), _GuardedForward):
                del layer.forward  # the class's forward again
        if not isinstance(error, str):
            log.debug("kernels.compile failed", exc_info=error)
        log.warning(f"kernels.compile: the {len(self.layers)} transformer layers run eagerly, not compiled, for "
                    f"the rest of the run: {self.fallback}. Set kernels.compile=false to run them eagerly "
                    "without this attempt.")

    def compiled_graph(self, seconds: float) -> None:
        self.graphs += 1
        self.compile_seconds += seconds
        if self.graphs == 1:
            log.info(f"kernels: torch.compile of {len(self.layers)} transformer layers: first step compiled in "
                     f"{seconds:.1f} s (one graph shared by all layers; fullgraph, static shapes)")
        else:  # e.g. full recompute's gradient pass, or evaluation
            log.info(f"kernels: transformer layers compiled graph {self.graphs} in {seconds:.1f} s (another grad "
                     "mode, train/eval or input shape)")


def _graphs_compiled() -> int:
    """Graphs dynamo has made in this process (all regions)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class _GuardedForward:
    """A layer's compiled forward; on a compile error, the eager forward for this call and all after it."""

    def __init__(self, region: CompiledLayers, eager: Callable, compiled: Callable) -> None:
        self.region, self.eager, self.compiled = region, eager, compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        region = self.region
        if region.fallback is not None:  # another layer failed after this one's forward was looked up
            return self.eager(*args, **kwargs)
        graphs = _graphs_compiled()
        start = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except _compile_errors() as error:
            region.fall_back(error)
            return self.eager(*args, **kwargs)
        if _graphs_compiled() != graphs:
            region.compiled_graph(time.perf_counter() - start)
        return out


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compile raises: dynamo's errors (Unsupported, BackendCompilerFailed wrapping
    inductor's, TorchRuntimeError from fake-tensor tracing) and, under fullgraph, the recompile limit."""
    from torch._dynamo import exc

    return (exc.TorchDynamoException, exc.FailOnRecompileLimitHit)


def _synchronous_dgrad_all_reduce(layers: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Switch the layers' column-parallel linears (TP > 1) to megatron-core's traceable gradient all-reduce.

    By default megatron-core all-reduces a column-parallel linear's input gradient asynchronously
    inside its backward, overlapped with the weight-gradient GEMM; dynamo cannot trace an async
    collective. With ``allreduce_dgrad`` off, the linear takes megatron-core's other path: its
    input goes through ``copy_to_tensor_model_parallel_region``, whose backward all-reduces
    synchronously, which dynamo traces as a functional all-reduce in the graph (inductor may still
    schedule its wait later). The same sum of the same gradients, so the same numbers.
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    switched = [module for layer in layers for module in layer.modules()
                if isinstance(module, ColumnParallelLinear) and module.allreduce_dgrad]
    for linear in switched:
        linear.allreduce_dgrad = False
    return switched


def _configure_dynamo() -> None:
    """The process-wide settings the module docstring explains."""
    import torch._dynamo.config
    import torch._functorch.config

    torch._functorch.config.force_non_lazy_backward_lowering = True
    torch._dynamo.config.ignore_logging_functions.add(warnings.warn)


def _reason(error: BaseException) -> str:
    """A compile error in one line: its first line, dynamo's explanation, and the user code it stopped at.

    Dynamo's messages run to pages (hints, links, the whole user stack); a backend's failure is
    reported through the error it wraps.
    """
    inner = getattr(error, "inner_exception", None)
    if inner is not None and str(inner).strip():
        error = inner
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"
    explanation = next((line.removeprefix("Explanation:").strip() for line in lines
                        if line.startswith("Explanation:")), None)
    if explanation:
        reason += f" ({explanation[:200]})"
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text.split("from user code:")[-1])
    if "from user code:" in text and frames:
        path, line, function = frames[-1]
        reason += f" at {path.split('site-packages/')[-1]}:{line} in {function}"
    return reason
