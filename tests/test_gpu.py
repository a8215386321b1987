"""GPU paths: NCCL, the Transformer Engine layer spec, bf16, tokens/s and MFU. Skipped without CUDA."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from tests.kiln_run import REPO, train

pytestmark = pytest.mark.gpu


def test_tiny_trains_on_gpu_in_bf16(tmp_path):
    metrics = train(tmp_path / "run", 1, "train.device=cuda", "train.precision=bf16", "train.max_steps=40",
                    "train.log_every=10", "logging.wandb=disabled", cache_dir=tmp_path / "cache")
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["max_memory_gib"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_on_two_gpus_matches_one(tmp_path):
    common = ("train.device=cuda", "train.precision=fp32", "train.max_steps=5", "train.log_every=1",
              "train.micro_batch_size=4", "train.global_batch_size=8", "logging.wandb=disabled")
    one = train(tmp_path / "one", 1, *common, cache_dir=tmp_path / "cache")
    two = train(tmp_path / "two", 2, *common, "parallel.tp=2", cache_dir=tmp_path / "cache")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)  # TF32/kernel choice differ across layouts


def test_step_overhead_bench_reports_mfu():
    out = subprocess.run([sys.executable, "bench/step_overhead.py", "--preset", "gpu", "--rounds", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MFU" in out.stdout and "ratio kiln / plain" in out.stdout


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_other_engines_train_on_gpu_in_bf16(engine, tmp_path):
    """NCCL and CUDA tensors through the fsdp and deepspeed engines (kiln's own statistics included)."""
    metrics = train(tmp_path / "run", 1, "train.device=cuda", "train.precision=bf16", "train.max_steps=20",
                    "train.log_every=5", "logging.wandb=disabled", f"parallel.engine={engine}",
                    "checkpoint.every=10", cache_dir=tmp_path / "cache")
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert metrics[-1]["loss"] < metrics[0]["loss"] and all(math.isfinite(m["loss"]) for m in metrics)
    assert (tmp_path / "run" / "checkpoints" / "step_000020" / "kiln-manifest.json").is_file()
