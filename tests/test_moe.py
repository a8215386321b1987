"""Mixture of experts through megatron-core, end to end on CPU (gloo), as a user runs it.

* parity: expert parallelism (EP=2, and EP=2 × TP=2 on 4 processes) gives the single-process
  EP=1 loss at every step (fp32, dropless);
* resharding: a checkpoint saved with EP=2 continues with EP=1 on the uninterrupted loss.

Load balancing is in tests/test_moe_balance.py (its own file, so the two run side by side).
"""

from __future__ import annotations

import pytest

from tests.kiln_run import PARITY_SETTINGS, TINY_MOE, assert_same_losses, train

pytestmark = pytest.mark.slow  # trains through the CLI (torchrun, gloo)

STEPS = 6
COMMON = (f"train.max_steps={STEPS}", *PARITY_SETTINGS, "optim.warmup_steps=2", "checkpoint.every=0")
SAVED_STEP = 3


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture(scope="module")
def ep1_single(tmp_path_factory, cache_dir):
    """The reference: one process, every expert on it."""
    return train(tmp_path_factory.mktemp("ep1") / "run", 1, *COMMON, "parallel.ep=1", config=TINY_MOE,
                 cache_dir=cache_dir)


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory, cache_dir):
    """Two processes, four experts each (dp=2 for attention, ep=2 for the experts)."""
    run_dir = tmp_path_factory.mktemp("ep2") / "run"
    return run_dir, train(run_dir, 2, *COMMON, "parallel.ep=2", f"checkpoint.every={SAVED_STEP}", config=TINY_MOE,
                          cache_dir=cache_dir)


def test_reference_learns_and_reports_routing(ep1_single):
    assert ep1_single[-1]["loss"] < ep1_single[0]["loss"]
    record = ep1_single[-1]
    for layer in (0, 1):  # tiny-moe: every layer is an MoE layer
        assert record[f"moe_load_cv_layer_{layer}"] >= 0
        assert 1.0 <= record[f"moe_load_max_over_mean_layer_{layer}"] <= 8.0
    assert record["moe_dropped_fraction"] == 0.0  # dropless
    assert record["moe_aux_loss"] > 0 and record["moe_z_loss"] > 0


def test_expert_parallel_matches_one_process(ep1_single, ep2_run):
    assert_same_losses(ep1_single, ep2_run[1], STEPS)


@pytest.mark.parametrize("name,nproc,layout", [
    ("ep2-tp2", 4, ("parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true")),
    pytest.param("ep2-allgather", 2, ("parallel.ep=2", "model.moe.token_dispatcher=allgather"),
                 marks=pytest.mark.extended),
    pytest.param("ep2-distributed-optimizer", 2, ("parallel.ep=2", "optim.distributed_optimizer=true"),
                 marks=pytest.mark.extended),
    # Experts whole on each rank while attention is split over TP.
    pytest.param("ep4-expert-tp1-tp2", 4, ("parallel.ep=4", "parallel.expert_tp=1", "parallel.tp=2",
                                           "parallel.sequence_parallel=true"), marks=pytest.mark.extended),
    pytest.param("ep1-pp2", 2, ("parallel.ep=1", "parallel.pp=2"), marks=pytest.mark.extended),
])
def test_parallel_layouts_match_one_process(ep1_single, name, nproc, layout, tmp_path, cache_dir):
    metrics = train(tmp_path / "run", nproc, *COMMON, *layout, config=TINY_MOE, cache_dir=cache_dir)
    assert_same_losses(ep1_single, metrics, STEPS)


def test_checkpoint_saved_with_ep2_resumes_with_ep1(ep2_run, tmp_path, cache_dir):
    run_dir, uninterrupted = ep2_run
    source = run_dir / "checkpoints" / f"step_{SAVED_STEP:06d}"
    resumed = train(tmp_path / "run", 1, *COMMON, "parallel.ep=1", f"checkpoint.resume_from={source}",
                    config=TINY_MOE, cache_dir=cache_dir)
    assert_same_losses(uninterrupted, resumed, STEPS, first_step=SAVED_STEP + 1)
