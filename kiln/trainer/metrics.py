"""What a logged step reports besides the loss: where the time went, memory, and stragglers.

The loop times each part of a step with :class:`StepClock` (host wall clock; the parts end at a
host sync, the loss and the gradient norm, so on a GPU they measure the device's work too).
At a logged step the window's totals become per-step means (seconds):

* ``time_data_wait_s``: blocked on the data loader;
* ``time_forward_backward_s``: forward and backward of every micro-batch, gradient reduction included;
* ``time_optimizer_s``: gradient norm, the callbacks' verdict (loss-spike guard), clipping and the update;
* ``time_checkpoint_s``: the loop held up by checkpointing (an async save's snapshot, a blocking save);
* ``time_other_s``: the rest of the window (logging, evaluation, callbacks, garbage collection).

Stragglers: each rank's busy time (data wait + its compute up to the gradient reduction, where the
engine can tell it apart; else its forward-backward) is gathered, and ``step_time_spread`` is the
slowest rank's over the median (1.0: balanced), ``slowest_rank`` which one.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from kiln.parallel import collectives

PARTS = ("data_wait", "forward_backward", "optimizer", "checkpoint")


class StepClock:
    """Seconds per part of the step, summed over the current logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.window_start = time.perf_counter()
        self.steps = 0
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.busy_s = 0.0  # this rank's own work, for the straggler spread

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    def window_metrics(self) -> dict[str, float]:
        """Per-step means of the window (call at a logged step, on every rank: gathers the spread)."""
        window_s = time.perf_counter() - self.window_start
        steps = max(self.steps, 1)
        metrics = {"step_time_s": window_s / steps}
        metrics.update({f"time_{part}_s": seconds / steps for part, seconds in self.seconds.items()})
        metrics["time_other_s"] = max(0.0, window_s - sum(self.seconds.values())) / steps
        busy = collectives.all_gather_object(self.busy_s / steps)
        median = statistics.median(busy)
        metrics["step_time_spread"] = max(busy) / median if median > 0 else 1.0
        metrics["slowest_rank"] = max(range(len(busy)), key=busy.__getitem__)
        return metrics


def memory_metrics(device: torch.device) -> dict[str, float]:
    """GiB, the largest over all ranks (the one that runs out first): the CUDA caching allocator's
    allocated, reserved and peak-allocated-since-the-last-log bytes on a GPU; the process's resident
    set on the host always (``host_rss_gib``). Collective."""
    import psutil

    values = {"host_rss_gib": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":
        values.update(memory_allocated_gib=torch.cuda.memory_allocated() / 2**30,
                      memory_reserved_gib=torch.cuda.memory_reserved() / 2**30,
                      memory_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()
    names = sorted(values)
    return dict(zip(names, collectives.reduce_floats([values[name] for name in names], op="max")))


def throughput_metrics(tokens_per_step: int, step_time_s: float, world_size: int, flops_per_token: float | None,
                       peak_flops: float | None) -> dict[str, Any]:
    """tokens/s over the whole job and per device; model TFLOP/s per device and MFU where known."""
    tokens_per_s = tokens_per_step / step_time_s
    metrics: dict[str, Any] = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / world_size}
    if flops_per_token:
        flops_per_device = flops_per_token * tokens_per_s / world_size
        metrics["tflops_per_device"] = flops_per_device / 1e12
        if peak_flops:
            metrics["mfu"] = flops_per_device / peak_flops
    return metrics
