"""Load balancing on configs/tiny-moe.yaml, as a user trains it: the expert-load coefficient of
variation falls during training with the aux loss, and with aux-loss-free expert-bias balancing,
and stays high with neither."""

from __future__ import annotations

import pytest

from tests.kiln_run import TINY_MOE, train

pytestmark = pytest.mark.slow  # trains through the CLI (torchrun, gloo)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kiln-cache")


BALANCE_STEPS = 60
BALANCE = (f"train.max_steps={BALANCE_STEPS}", "train.log_every=10", "parallel.ep=1", "checkpoint.every=0",
           "logging.wandb=disabled")
BALANCERS = {
    "none": ("model.moe.aux_loss_coeff=0",),
    "aux loss": ("model.moe.aux_loss_coeff=0.1",),
    "expert bias": ("model.moe.aux_loss_coeff=0", "model.moe.expert_bias=true", "model.moe.score_function=sigmoid",
                    "model.moe.expert_bias_update_rate=0.01"),
}


@pytest.fixture(scope="module")
def load_cv(tmp_path_factory, cache_dir):
    """The mean expert-load coefficient of variation at each logged step, per balancer (trained on first use)."""

    class Runs(dict):
        def __missing__(self, balancer):
            run_dir = tmp_path_factory.mktemp("balance") / "run"
            metrics = train(run_dir, 1, *BALANCE, *BALANCERS[balancer], config=TINY_MOE, cache_dir=cache_dir)
            self[balancer] = [m["moe_load_cv"] for m in metrics]
            return self[balancer]

    return Runs()


def test_without_balancing_the_load_stays_uneven(load_cv):
    # The router collapses onto a few experts: the CV of 8 experts with 2 of them taking
    # everything is sqrt(3) = 1.73.
    assert min(load_cv["none"][2:]) > 1.0, load_cv["none"]


@pytest.mark.parametrize("balancer", ["aux loss", pytest.param("expert bias", marks=pytest.mark.extended)])
def test_balancing_evens_the_load_during_training(load_cv, balancer):
    cv, unbalanced = load_cv[balancer], load_cv["none"]
    assert cv[-1] < 0.6 * max(cv), f"{balancer}: the CV does not fall during training: {cv}"
    assert cv[-1] < 0.6 * unbalanced[-1], f"{balancer}: {cv} vs without balancing {unbalanced}"
