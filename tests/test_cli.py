"""The `kiln` command as the README tells a user to run it."""

from __future__ import annotations

import pytest

import math

import yaml

from tests.kiln_run import TINY, kiln, train


def test_dry_run_llama3_8b_on_64_gpus():
    result = kiln("train", "configs/llama3-8b.yaml", "--dry-run", "--world-size", "64")
    out = result.stdout
    assert "8.03B" in out
    assert "tp groups" in out and "dp groups" in out and "pp groups" in out
    assert "world 64" in out


def test_layout_that_does_not_divide_the_world_stops_before_starting_processes():
    result = kiln("train", TINY, "--nproc-per-node", "2", "parallel.tp=3", check=False)
    assert result.returncode == 2
    assert "tp(3) × pp(1) × cp(1) = 3 does not divide world size 2" in result.stderr
    assert "torch.distributed" not in result.stderr  # no worker was started


def test_heads_not_divisible_by_tp_shows_the_arithmetic():
    result = kiln("train", "configs/llama3-8b.yaml", "--dry-run", "--world-size", "48", "parallel.tp=3", check=False)
    assert result.returncode == 2
    assert "num_attention_heads(32) is not divisible by parallel.tp(3)" in result.stderr
    assert "32 / 3" in result.stderr


def test_unknown_key_names_the_nearest_valid_one():
    result = kiln("train", TINY, "--dry-run", "optim.lrr=1e-3", check=False)
    assert result.returncode == 2
    assert "unknown setting 'optim.lrr'; did you mean 'optim.lr'?" in result.stderr


def test_wrong_type_names_the_setting():
    result = kiln("train", TINY, "--dry-run", "train.max_steps=many", check=False)
    assert result.returncode == 2
    assert "train.max_steps: expected an integer, got 'many'" in result.stderr


@pytest.mark.slow
def test_tiny_trains_and_the_loss_falls(tmp_path):
    """What `make train` does, shortened: 2 processes (dp 2) on the bundled corpus, W&B offline."""
    run_dir = tmp_path / "run"
    metrics = train(run_dir, 2, "train.max_steps=60", "train.log_every=10", cache_dir=tmp_path / "cache")
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    for m in metrics:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= m.keys()
        assert m["tokens_per_s"] > 0 and math.isfinite(m["grad_norm"])
    vocab = 4096
    assert metrics[-1]["loss"] < 0.8 * math.log(vocab), metrics[-1]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 60 and resolved["parallel"]["tp"] == 1
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"


@pytest.mark.slow
@pytest.mark.extended  # bf16 matmuls are slow on CPU; fp32 runs are in `make test`
def test_bf16_run(tmp_path):
    metrics = train(tmp_path / "run", 1, "train.precision=bf16", "train.max_steps=3", "train.log_every=1",
                    "logging.wandb=disabled", "train.global_batch_size=4", cache_dir=tmp_path / "cache")
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)
    for m in metrics:  # plain finite JSON numbers, nothing a dashboard cannot plot
        bad = {k: v for k, v in m.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
        assert not bad, f"step {m.get('step')}: non-numeric or non-finite metrics {bad}"


def test_missing_dataset_stops_before_starting_processes(tmp_path):
    result = kiln("train", TINY, "--nproc-per-node", "2", f"data.path={tmp_path / 'nowhere'}", check=False)
    assert result.returncode == 2
    assert "is not a kiln dataset" in result.stderr and "kiln data prepare" in result.stderr
    assert "run directory" not in result.stdout  # nothing was started
