"""Run megatron-core's real code paths on CPU with gloo, where CUDA is absent.

megatron-core is written for CUDA. Its layers, pipeline schedules, DDP and optimizers work on
CPU once a few assumptions hold, and this module makes them hold for the whole process:

* ``torch.cuda.current_device()`` places buffers; it yields the CPU device.
  ``torch.cuda.current_stream()`` (megatron-core 0.19's gradient buffers wait on it for CUDA
  graph events) yields torch's CPU stream, whose waits are no-ops.
* Factory calls with a literal ``device="cuda"`` (the schedule's token counter, gradient
  clipping's norm buffer, the default causal mask) are mapped to CPU by a
  ``TorchFunctionMode``, which also makes ``Tensor.cuda()`` a no-op.
* The optimizer wrappers assert type strings such as ``'torch.cuda.FloatTensor'``; the same
  mode answers ``Tensor.type()`` with the CUDA spelling of the CPU type.
* The CUDA RNG tracker gets a CPU counterpart that keeps named CPU generator states.
* ``torch.cuda.Stream``/``Event``/``stream`` (the MoE all-to-all dispatcher copies its split sizes
  to the host on a side stream and waits on an event) become no-ops: CPU work is in order; and
  ``all_to_all_single`` takes the split sizes that then stay tensors, and ``all_gather`` and
  ``reduce_scatter`` take pieces of different lengths (as NCCL does, and gloo does not).

This is what lets ``kiln train --device cpu`` rehearse a cluster's exact parallel layout on a
laptop (or on a GPU login node: the GPUs are then hidden from the process, so that megatron-core
and DeepSpeed take the CPU paths), and what lets CI test TP/PP/DP parity. It is switched on by
:func:`kiln.parallel.backend.init_parallel` for ``train.device=cpu`` only.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_installed = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU and answers type queries with CUDA spellings."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        device = kwargs.get("device")
        if device is not None and (_is_cuda(device) or isinstance(device, int)):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and (_is_cuda(args[1]) or isinstance(args[1], int)):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """CPU stand-in for megatron-core's ``CudaRNGStatesTracker``: named CPU generator states.

    ``fork(name)`` swaps the process's default CPU generator to the named state for the duration
    of the block, which is how megatron-core keeps TP-rank-specific dropout streams.
    """

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _CpuEvent:
    """A CUDA event on CPU: work is already done when it is recorded."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """A CUDA side stream on CPU: everything runs in issue order, so waits are no-ops."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _CpuEvent:
        return event or _CpuEvent()

    def synchronize(self) -> None:
        pass


def _all_to_all_single_taking_tensor_splits(all_to_all_single):
    """all_to_all_single whose split sizes may be tensors. The MoE all-to-all dispatcher copies its
    split sizes from the GPU to host (numpy) arrays; on CPU that copy is skipped, they stay tensors,
    and the collective refuses them (the patch is at module level because the backward's call runs
    inside Tensor.backward, where no TorchFunctionMode sees it)."""

    @functools.wraps(all_to_all_single)
    def wrapper(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return all_to_all_single(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    return wrapper


def _all_gather_taking_uneven_sizes(all_gather):
    """all_gather whose output tensors may differ in their first dimension, as NCCL allows and gloo
    does not (the MoE all-to-all dispatcher gathers each expert-TP rank's tokens this way): the
    pieces are padded to the longest, gathered, and cut back."""

    @functools.wraps(all_gather)
    def wrapper(tensor_list, tensor, group=None, async_op=False):
        rows = [piece.shape[0] for piece in tensor_list]
        if len(set(rows)) <= 1 or async_op:
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(rows)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        all_gather(gathered, padded, group=group)
        for piece, full, count in zip(tensor_list, gathered, rows):
            piece.copy_(full[:count])
        return None

    return wrapper


def _reduce_scatter_taking_uneven_sizes(reduce_scatter):
    """reduce_scatter of a list of pieces of different lengths (the backward of the uneven
    all_gather above), which gloo lacks: every piece padded to the longest, all-reduced, and this
    rank's piece cut out."""

    @functools.wraps(reduce_scatter)
    def wrapper(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        rows = [piece.shape[0] for piece in input_list]
        if len(set(rows)) <= 1 or async_op:
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        longest = max(rows)
        stacked = output.new_zeros((len(input_list), longest, *output.shape[1:]))
        for index, piece in enumerate(input_list):
            stacked[index, :piece.shape[0]] = piece
        torch.distributed.all_reduce(stacked, op=op, group=group)
        own = torch.distributed.get_rank(group)
        output.copy_(stacked[own, :rows[own]])
        return None

    return wrapper


def install() -> None:
    """Switch the process into CPU emulation of CUDA for megatron-core. Idempotent."""
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        # The launcher hides GPUs from CPU workers (CUDA_VISIBLE_DEVICES=""); an in-process run
        # may have asked CUDA already, after which the variable is no longer read.
        log.info("train.device=cpu on a machine with %d GPU(s): hidden from this process", torch.cuda.device_count())
        torch.cuda.is_available = lambda: False  # type: ignore[assignment]
        torch.cuda.device_count = lambda: 0  # type: ignore[assignment]
    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: torch.cpu.current_stream()  # type: ignore[assignment]
    torch.distributed.all_to_all_single = _all_to_all_single_taking_tensor_splits(torch.distributed.all_to_all_single)
    torch.distributed.all_gather = _all_gather_taking_uneven_sizes(torch.distributed.all_gather)
    torch.distributed.reduce_scatter = _reduce_scatter_taking_uneven_sizes(torch.distributed.reduce_scatter)
    torch.cuda.Stream = _CpuStream  # type: ignore[assignment]
    torch.cuda.Event = _CpuEvent  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.manual_seed = torch.manual_seed  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # Entered for the life of the process on purpose: megatron-core creates CUDA tensors
    # from deep inside its schedules and optimizers, long after any `with` block would close.
    _CudaToCpuMode().__enter__()
    _installed = True
    log.info("CUDA is absent: megatron-core runs on CPU with gloo (kiln CPU emulation)")
