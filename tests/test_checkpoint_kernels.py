"""Checkpoints cross kernel choices: the local layer spec (CPU) and the TE spec (GPU) load each other's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.kiln_run import PARITY_SETTINGS, REPO, read_metrics, train

pytestmark = pytest.mark.slow  # trains through the CLI

_EXTRA_STATE_RESUME = """
import sys
import torch
from kiln.kernels import attention
from kiln.cli import main

class AttentionWithExtraState(attention.KilnAttention):
    '''Carries extra state like Transformer Engine's modules (their FP8 scaling history).'''
    states_set = []
    def get_extra_state(self):
        return torch.tensor([7.0])
    def set_extra_state(self, state):
        AttentionWithExtraState.states_set.append(float(state[0]))

if sys.argv[1] == "extra-state":
    attention.KilnAttention = AttentionWithExtraState
code = main(["train", "configs/tiny.yaml", *sys.argv[2:]])
print("extra states set:", AttentionWithExtraState.states_set)
sys.exit(code)
"""


@pytest.mark.extended
def test_local_spec_checkpoint_resumes_into_modules_with_extra_state(tmp_path):
    """A checkpoint without TE's `_extra_state` entries (the local spec, a CPU rehearsal) resumes
    into a model whose modules have them (the TE spec on the cluster); the weights still load."""
    cache_dir = tmp_path / "cache"
    common = ["train.max_steps=4", "train.log_every=1", "checkpoint.every=2", *PARITY_SETTINGS]
    train(tmp_path / "first", 1, *common, "train.max_steps=2", cache_dir=cache_dir)
    losses = {}
    for variant in ("plain", "extra-state"):
        run_dir = tmp_path / variant
        shutil.copytree(tmp_path / "first", run_dir)
        env = {**os.environ, "KILN_CACHE_DIR": str(cache_dir)}
        out = subprocess.run([sys.executable, "-c", _EXTRA_STATE_RESUME, variant, *common,
                              f"train.run_dir={run_dir}"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        # The checkpoint had none: each module keeps its own (one per layer), nothing is invented.
        assert "extra states set: " + ("[7.0, 7.0]" if variant == "extra-state" else "[]") in out.stdout
        losses[variant] = [m["loss"] for m in read_metrics(run_dir) if m["step"] > 2]
    assert len(losses["plain"]) == 2 and losses["extra-state"] == losses["plain"]
