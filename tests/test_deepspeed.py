"""The DeepSpeed engine: ZeRO-1/2/3 over megatron-core TP, against the megatron engine.

The multi-process cases run the real CLI under torchrun (gloo, DeepSpeed's CPU accelerator)
and compare each step's loss with one megatron-engine process on the same global batch, in
fp32, with gradient clipping active (the clip is below the gradient norm from step 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.config import config_from_dict
from kiln.errors import KilnConfigError
from kiln.engine.deepspeed import deepspeed_config
from tests.kiln_run import PARITY_SETTINGS, kiln, read_metrics, train
from tests.kiln_run import assert_same_losses as same_losses

STEPS = 8
COMMON = (f"train.max_steps={STEPS}", *PARITY_SETTINGS, "optim.grad_clip=0.3", "checkpoint.every=0")
DEEPSPEED = ("parallel.engine=deepspeed",)
REL_TOL = 1e-4


def zero(stage: int) -> tuple[str, ...]:
    return (*DEEPSPEED, f"parallel.zero_stage={stage}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture(scope="module")
def megatron_baseline(tmp_path_factory, cache_dir) -> list[dict]:
    return train(tmp_path_factory.mktemp("megatron") / "run", 1, *COMMON, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """DeepSpeed runs by (stage, nproc, tp), each trained once per module: (run dir, metrics).

    ZeRO-3 runs also save at step 4, the starting point of the resume cases.
    """
    done: dict[tuple, tuple[Path, list[dict]]] = {}

    def get(stage: int, nproc: int, tp: int = 1, *extra: str) -> tuple[Path, list[dict]]:
        key = (stage, nproc, tp, *extra)
        if key not in done:
            run_dir = tmp_path_factory.mktemp(f"zero{stage}-n{nproc}-tp{tp}") / "run"
            saves = ("checkpoint.every=4",) if stage == 3 else ()
            metrics = train(run_dir, nproc, *COMMON, *zero(stage), f"parallel.tp={tp}", *saves, *extra,
                            cache_dir=cache_dir)
            done[key] = run_dir, metrics
        return done[key]

    return get


def assert_same_losses(reference: list[dict], candidate: list[dict], first_step: int = 1) -> None:
    same_losses(reference, candidate, STEPS, first_step, rel_tol=REL_TOL)


# -- config ----------------------------------------------------------------------------
def test_generated_deepspeed_config_follows_kiln_config() -> None:
    config = config_from_dict({}, [*zero(3), "train.micro_batch_size=2", "train.global_batch_size=16",
                                   "train.precision=fp16", "optim.grad_clip=0.5", "parallel.offload_optimizer=cpu",
                                   "parallel.offload_params=nvme", "parallel.nvme_path=/local/nvme",
                                   "deepspeed={zero_optimization: {reduce_bucket_size: 1000}, flops_profiler: {enabled: true}}"])
    ds = deepspeed_config(config.parallel, config.optim, config.train, config.deepspeed, dp_size=4, cuda=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]  # dynamic scaling
    zero_section = ds["zero_optimization"]
    assert zero_section["stage"] == 3
    assert zero_section["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero_section["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/local/nvme"}
    # The deepspeed: section is merged key by key over what kiln generates.
    assert zero_section["reduce_bucket_size"] == 1000 and zero_section["contiguous_gradients"] is True
    assert ds["flops_profiler"] == {"enabled": True}


@pytest.mark.parametrize("overrides,message", [
    ((*zero(1), "parallel.pp=2"), "does not run pipeline parallelism"),
    ((*zero(1), "parallel.tp=2", "parallel.sequence_parallel=true"), "sequence_parallel=false"),
    ((*zero(2), "parallel.offload_params=cpu"), "needs parallel.zero_stage=3"),
    ((*zero(3), "parallel.offload_optimizer=nvme"), "parallel.nvme_path"),
    ((*zero(4),), "must be 1, 2 or 3"),
    ((*zero(1), "optim.distributed_optimizer=true"), "optim.distributed_optimizer=false"),
    (("train.precision=fp16",), "needs parallel.engine=deepspeed"),
    (("parallel.offload_optimizer=cpu",), "need parallel.engine=deepspeed"),
    (("deepspeed={zero_optimization: {stage: 2}}",), "set parallel.engine=deepspeed or remove the section"),
])
def test_bad_deepspeed_settings_are_config_errors(overrides, message) -> None:
    with pytest.raises(KilnConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({}, list(overrides))


def test_pipeline_with_deepspeed_stops_before_launch(tmp_path) -> None:
    result = kiln("train", "configs/tiny.yaml", "--nproc-per-node", "2", *zero(1), "parallel.pp=2",
                  f"train.run_dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2 and "does not run pipeline parallelism" in result.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_names_the_zero_stage_and_offload() -> None:
    out = kiln("train", "configs/tiny.yaml", "--dry-run", "--world-size", "4", *zero(3),
               "parallel.offload_optimizer=cpu").stdout
    assert "engine deepspeed (ZeRO-3, offload optimizer → cpu)" in out


# -- parity ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.extended), 3])
def test_zero_dp2_matches_megatron_single_process(stage, runs, megatron_baseline) -> None:
    _, metrics = runs(stage, 2)
    assert_same_losses(megatron_baseline, metrics)


@pytest.mark.slow
@pytest.mark.extended  # 4 processes; ZeRO-1 and ZeRO-3 at DP=2 are in `make test`
def test_zero3_tp2_dp2_matches_megatron_single_process(runs, megatron_baseline) -> None:
    _, metrics = runs(3, 4, 2)
    assert_same_losses(megatron_baseline, metrics)


# -- per-rank state bytes ----------------------------------------------------------------
def state_bytes(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "state_bytes.json").read_text())["ranks"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.extended), 3])  # ZeRO-2 runs: extended
def test_zero_shards_state_over_data_parallel_ranks(stage, runs) -> None:
    one = state_bytes(runs(stage, 1)[0] if stage == 3 else runs(stage, 1, 1, "train.max_steps=1")[0])
    two = state_bytes(runs(stage, 2)[0])
    assert len(one) == 1 and len(two) == 2
    for rank in two:
        optimizer_ratio = rank["optimizer"] / one[0]["optimizer"]
        assert 0.45 < optimizer_ratio < 0.55, f"ZeRO-{stage} rank {rank['rank']}: optimizer bytes x{optimizer_ratio:.3f}"
        params_ratio = rank["parameters"] / one[0]["parameters"]
        if stage == 3:
            assert 0.45 < params_ratio < 0.55, f"ZeRO-3 rank {rank['rank']}: parameter bytes x{params_ratio:.3f}"
        else:
            assert params_ratio == 1.0


# -- checkpoints at another DP size --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("saved_nproc,resumed_nproc", [(2, 1), pytest.param(1, 2, marks=pytest.mark.extended)])
def test_zero3_checkpoint_resumes_at_another_dp_size(saved_nproc, resumed_nproc, runs, megatron_baseline, tmp_path,
                                                     cache_dir) -> None:
    saved_dir, _ = runs(3, saved_nproc)
    step4 = saved_dir / "checkpoints" / "step_000004"
    resumed = tmp_path / "resumed"
    kiln("train", "configs/tiny.yaml", "--nproc-per-node", str(resumed_nproc), f"train.run_dir={resumed}",
         "--resume-from", str(step4), *COMMON, *zero(3), cache_dir=cache_dir)
    assert_same_losses(megatron_baseline, read_metrics(resumed), first_step=5)
