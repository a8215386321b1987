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
    assert metrics[-1]["memory_peak_gib"] > 0


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


def test_same_seed_gives_the_same_weights_on_gpu_and_cpu():
    """A CPU rehearsal and the GPU run start from the same model (draws are on a CPU generator)."""
    script = """
import torch
from kiln.log import quiet_third_party; quiet_third_party()
from kiln.config import config_from_dict
from kiln.model.builder import build_model
from kiln.parallel.backend import init_parallel
config = config_from_dict({}, ["train.precision=fp32", "train.device=%s"])
ctx = init_parallel(config.train.device, config.train.seed, config.layout)
(model,) = build_model(config.model, config.parallel, config.train, ctx, vocab_size=256)
torch.save({n: p.detach().cpu() for n, p in model.named_parameters()}, "%s")
"""
    weights = {}
    for device in ("cuda", "cpu"):
        path = REPO / "runs" / f"init-{device}.pt"
        path.parent.mkdir(exist_ok=True)
        # Separate processes: CPU emulation and CUDA cannot share one.
        out = subprocess.run([sys.executable, "-c", script % (device, path)], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        weights[device] = torch.load(path)
        path.unlink()
    assert weights["cuda"].keys() == weights["cpu"].keys()
    for name, value in weights["cpu"].items():
        assert torch.equal(weights["cuda"][name], value), name


def test_te_optimizer_state_survives_a_resume(tmp_path):
    """With TE installed megatron-core uses TE's FusedAdam; a resume must load its state."""
    pytest.importorskip("transformer_engine.pytorch")
    common = ("train.device=cuda", "train.precision=bf16", "train.log_every=2", "logging.wandb=disabled",
              "optim.distributed_optimizer=true", "checkpoint.every=4")
    first = train(tmp_path / "run", 1, *common, "train.max_steps=4", cache_dir=tmp_path / "cache")
    resumed = train(tmp_path / "run", 1, *common, "train.max_steps=8", cache_dir=tmp_path / "cache")
    assert first[-1]["step"] == 4 and resumed[-1]["step"] == 8


def test_training_batches_come_from_pinned_memory():
    """The loader collates into page-locked memory on GPU runs: the step's host-to-device copy is asynchronous."""
    from kiln.data.bundled import ensure_bundled_dataset
    from kiln.data.loader import build_train_loader

    loader = build_train_loader(ensure_bundled_dataset(128), micro_batch_size=2, seed=0, dp_rank=0, dp_size=1,
                                prefetch=2, pin_memory=True)
    try:
        assert next(iter(loader))["tokens"].is_pinned()
    finally:
        loader.close()
