"""The CPU stand-in for megatron-core's CUDA RNG tracker keeps independent named streams."""

from __future__ import annotations

import pytest
import torch

from kiln.parallel.cpu_emulation import CpuRNGStatesTracker


def test_fork_uses_and_advances_the_named_stream_only():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 42)
    torch.manual_seed(0)
    outside_before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside_before)  # the default stream is untouched
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    torch.manual_seed(42)
    expected = torch.rand(6)
    assert torch.equal(torch.cat([first, second]), expected)  # one continuous seeded stream


def test_states_round_trip_and_errors():
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    saved = tracker.get_states()
    with tracker.fork("a"):
        x = torch.rand(2)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(2), x)
    with pytest.raises(RuntimeError, match="already exists"):
        tracker.add("b", 1)
    with pytest.raises(RuntimeError, match="is not added"):
        with tracker.fork("missing"):
            pass
