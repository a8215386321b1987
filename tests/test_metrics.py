"""What a logged step reports: the step-time breakdown, memory, throughput and the straggler spread."""

from __future__ import annotations

import time

import pytest

from tests.distributed import run_distributed
from tests.test_engines import _CountingBatches

SLOW_DATA_S = 0.6  # rank 1 waits this long for each micro-batch: a straggler


class _SlowBatches(_CountingBatches):
    def __next__(self) -> dict:
        time.sleep(SLOW_DATA_S)
        return super().__next__()


def _train_with_a_slow_rank(rank: int) -> list[dict]:
    from kiln.config import config_from_dict
    from kiln.parallel.backend import destroy_parallel, init_parallel
    from kiln.train import build_run_engine
    from kiln.trainer.loop import Trainer

    config = config_from_dict({}, ["model.vocab_size=256", "train.precision=fp32", "train.device=cpu",
                                   "train.max_steps=4", "train.log_every=2", "train.micro_batch_size=2",
                                   "train.global_batch_size=4", "logging.wandb=disabled"])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    batches = (_SlowBatches if rank == 1 else _CountingBatches)(ctx.coords["dp"], 128)
    trainer = Trainer(train=config.train, data=config.data, seq_len=config.model.seq_len, ctx=ctx,
                      engine=build_run_engine(config, ctx, 256), batches=batches, callbacks=[],
                      flops_per_token=1e6, peak_flops=1e12)
    history = trainer.train()
    destroy_parallel()
    return history


def test_breakdown_memory_throughput_and_the_slow_rank():
    ranks = run_distributed(_train_with_a_slow_rank, 2)
    assert [m["step"] for m in ranks[0]] == [m["step"] for m in ranks[1]] == [2, 4]
    for m in ranks[0]:
        parts = ("data_wait", "forward_backward", "optimizer", "checkpoint", "other")
        assert all(m[f"time_{part}_s"] >= 0 for part in parts)
        assert sum(m[f"time_{part}_s"] for part in parts) == pytest.approx(m["step_time_s"], rel=1e-6)
        # Rank 0 waits for rank 1 inside the gradient all-reduce: the step is as slow as rank 1's data.
        assert m["step_time_s"] > SLOW_DATA_S
        # With 2 ranks the median is their mean: rank 1's share is > 1 however slow the machine's compute.
        assert m["slowest_rank"] == 1 and m["step_time_spread"] > 1.05
        assert m["tokens_per_s"] == pytest.approx(4 * 128 / m["step_time_s"])
        assert m["tokens_per_s_per_device"] == pytest.approx(m["tokens_per_s"] / 2)
        assert m["tflops_per_device"] == pytest.approx(1e6 * m["tokens_per_s_per_device"] / 1e12)
        assert m["mfu"] == pytest.approx(m["tflops_per_device"] * 1e12 / 1e12)
        assert 0 < m["host_rss_gib"] < 64 and "memory_peak_gib" not in m  # GPU memory only on a GPU
    # The spread and the memory are gathered: every rank logs the same.
    assert [(m["slowest_rank"], m["host_rss_gib"]) for m in ranks[1]] == \
           [(m["slowest_rank"], m["host_rss_gib"]) for m in ranks[0]]
