"""LR schedules, and weight decay only on matrices (never on norms and biases)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from kiln.config import config_from_dict
from kiln.engine.schedule import build_lr_scheduler
from tests.kiln_run import REPO


class _Groups:
    def __init__(self) -> None:
        self.param_groups = [{"params": []}]


def _lrs(*overrides: str) -> list[float]:
    config = config_from_dict({}, ["optim.lr=1.0", "optim.min_lr=0.1", "train.max_steps=10", *overrides])
    optimizer = _Groups()
    scheduler = build_lr_scheduler(config.optim, config.train.max_steps, optimizer)
    lrs = []
    for _ in range(config.train.max_steps):
        scheduler.step(increment=1)  # as the trainer does before each optimizer step
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_warmup_then_cosine():
    lrs = _lrs("optim.warmup_steps=2", "optim.schedule=cosine")
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[-1] == pytest.approx(0.1)
    # halfway through the 8 decay steps the cosine is at the midpoint
    assert lrs[2 + 4 - 1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_linear_and_constant():
    assert _lrs("optim.schedule=linear")[4] == pytest.approx(1.0 - 0.9 * 5 / 10)
    assert _lrs("optim.schedule=constant", "optim.warmup_steps=2") == pytest.approx([0.5] + [1.0] * 9)


def test_warmup_stable_decay():
    lrs = _lrs("optim.schedule=wsd", "optim.warmup_steps=2", "optim.wsd_decay_fraction=0.25")
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2:8] == pytest.approx([1.0] * 6)  # stable for 6 of the 8 decay steps
    assert lrs[-1] == pytest.approx(0.1)


_PARAM_GROUPS_SCRIPT = """
import json
from kiln.config import config_from_dict
from kiln.log import quiet_third_party
quiet_third_party()
from kiln.parallel.backend import init_parallel
from kiln.train import build_run_engine
config = config_from_dict({}, ["model.vocab_size=256", "train.precision=fp32", "train.device=cpu"])
ctx = init_parallel(config.train.device, config.train.seed, config.layout)
engine = build_run_engine(config, ctx, 256)  # its scheduler applies each group's weight decay
names = {id(p): n for n, p in engine.model_parts[0].named_parameters()}
print(json.dumps({names[id(p)]: g["weight_decay"] for g in engine.optimizer.param_groups for p in g["params"]}))
"""


def test_no_weight_decay_on_norms():
    result = subprocess.run([sys.executable, "-c", _PARAM_GROUPS_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    decay = json.loads(result.stdout.strip().splitlines()[-1])
    norms = [n for n in decay if "layernorm" in n]
    matrices = [n for n in decay if n.endswith(("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight"))]
    assert norms and matrices
    assert all(decay[n] == 0.0 for n in norms), decay
    assert all(decay[n] == pytest.approx(0.1) for n in matrices), decay
