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


def test_kiln_attention_matches_megatron_dot_product_attention():
    """kiln's SDPA core attention equals megatron-core's reference (causal, GQA) to fp32 rounding."""
    import subprocess
    import sys

    from tests.kiln_run import REPO

    script = """
import torch
from kiln.log import quiet_third_party; quiet_third_party()
from kiln.config import config_from_dict
from kiln.parallel.backend import init_parallel
from kiln.model.builder import transformer_config
from kiln.kernels.attention import KilnAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
config = config_from_dict({}, ["model.num_attention_heads=4", "model.num_query_groups=2", "train.precision=fp32"])
ctx = init_parallel(config.train.device, config.train.seed, config.layout)
tc = transformer_config(config.model, config.parallel, config.train, ctx)
ref = DotProductAttention(tc, 1, AttnMaskType.causal, "self", pg_collection=ctx.pg_collection)
ours = KilnAttention(tc, 1, AttnMaskType.causal, "self", backend="sdpa")
g = torch.Generator().manual_seed(0)
q = torch.randn(16, 2, 4, 16, generator=g); k = torch.randn(16, 2, 2, 16, generator=g); v = torch.randn(16, 2, 2, 16, generator=g)
mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)
print(float((ref(q, k, v, mask) - ours(q, k, v, None)).abs().max()))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5
