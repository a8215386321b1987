"""kiln's statistics are reduced on the run's device (NCCL rejects CPU tensors).

The GPU failure this guards against ("No backend type associated with device type cpu" at
the first logged step) cannot happen on a CPU machine, where gloo reduces anything. So the
device is bound once and no caller can name another; these tests hold that construction.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from kiln.parallel import collectives


class _Reduced(Exception):
    """Stops the call after the reduction: a meta tensor has no values to read back."""


@pytest.fixture
def recorded_reductions(monkeypatch):
    devices: list[torch.device] = []

    def all_reduce(tensor, op=None, group=None):
        devices.append(tensor.device)
        raise _Reduced

    monkeypatch.setattr(collectives.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(collectives, "_device", None)
    return devices


def test_reductions_use_the_bound_device(recorded_reductions):
    # "meta" stands in for a GPU: what matters is that the tensor follows the binding, not the CPU.
    collectives.bind_device(torch.device("meta"))
    with pytest.raises(_Reduced):
        collectives.reduce_floats([1.0, 2.0], op="max")
    with pytest.raises(_Reduced):
        collectives.mean_over_holders(None)
    assert recorded_reductions == [torch.device("meta")] * 2


def test_reducing_before_a_device_is_bound_is_an_error(recorded_reductions):
    with pytest.raises(RuntimeError, match="init_parallel binds"):
        collectives.reduce_floats([1.0])
    assert recorded_reductions == []


def test_no_collective_takes_a_device_from_its_caller():
    public = [f for name, f in vars(collectives).items()
              if inspect.isfunction(f) and not name.startswith("_") and f.__module__ == collectives.__name__]
    assert len(public) >= 6
    takes_device = [f.__name__ for f in public if "device" in inspect.signature(f).parameters and f is not collectives.bind_device]
    assert not takes_device, f"{takes_device} let a caller pick the tensor's device"


def test_init_parallel_binds_the_runs_device():
    from tests.distributed import run_distributed

    assert run_distributed(_bound_device_in_a_world, 1) == ["cpu"]


def _bound_device_in_a_world(rank):
    from kiln.parallel.backend import init_parallel
    from kiln.parallel.layout import ParallelLayout

    init_parallel("cpu", 0, lambda world: ParallelLayout(world_size=world, tp=1, pp=1, cp=1, dp=world))
    return str(collectives.bound_device())
