"""The training loop: global batch → engine step → callbacks, on every rank.

One optimizer step consumes ``global_batch_size`` samples: each data-parallel replica draws
``num_microbatches`` micro-batches of ``micro_batch_size``, the engine accumulates their
gradients (``forward_backward``) and measures them (``measure_gradients``), the callbacks may
veto the update (``skip_update``), and the engine applies it (``optimizer_step``). Checkpoint
cadence, preemption, evaluation, rollbacks and the quarantine of bad global batches are the
loop's; everything the engine does is behind :class:`~kiln.engine.base.Engine`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch

from kiln.config import DataConfig, TrainConfig
from kiln.engine.base import Engine, StepResult
from kiln.parallel import collectives
from kiln.trainer.callbacks import Callback
from kiln.trainer.metrics import StepClock, memory_metrics, throughput_metrics

log = logging.getLogger("kiln")

BatchPosition = tuple[int, int]
"""(epoch, sample_in_epoch) where a global batch starts in the data stream: the same on every rank and topology."""


class Quarantine:
    """Global batches that are never trained on: a checkpoint part. Loading merges (a rollback
    reloads a checkpoint older than the batches it is rolling back from)."""

    def __init__(self) -> None:
        self.positions: set[BatchPosition] = set()

    def __contains__(self, position: BatchPosition | None) -> bool:
        return position in self.positions

    def add(self, position: BatchPosition) -> None:
        self.positions.add(tuple(position))

    def state_dict(self) -> dict[str, Any]:
        return {"positions": sorted(self.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.positions |= {tuple(p) for p in state.get("positions", [])}


@dataclass
class TrainState:
    """The loop's counters; a checkpoint part."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class Trainer:
    def __init__(
        self,
        *,
        train: TrainConfig,
        data: DataConfig,
        seq_len: int,
        ctx,
        engine: Engine,
        batches: Iterator[dict[str, torch.Tensor]],
        callbacks: list[Callback],
        checkpoint_every: int = 0,
        checkpointer=None,
        preemption=None,
        val_batches: list[dict[str, torch.Tensor]] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        self.train_config, self.val_every, self.ctx = train, data.val.every, ctx
        self.engine, self.batches, self.callbacks = engine, batches, callbacks
        self.checkpoint_every, self.checkpointer, self.preemption = checkpoint_every, checkpointer, preemption
        self.val_batches = val_batches
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.num_microbatches = ctx.layout.num_microbatches(train)
        self.tokens_per_step = train.global_batch_size * seq_len
        self.state = TrainState()
        self.quarantine = Quarantine()
        self.batch_position: BatchPosition | None = None
        """Where this step's global batch starts in the data stream (None: the iterator cannot tell)."""
        self.clock = StepClock()
        self._loader_started = False
        self._rollback_requested = False

    # -- what callbacks may use ------------------------------------------------------------
    def global_loss(self, result: StepResult) -> float:
        """This step's loss averaged over data-parallel replicas (a collective: call it on every rank)."""
        return collectives.mean_over_holders(result.loss)

    def request_rollback(self) -> None:
        """Reload the newest checkpoint before the next step (call on every rank)."""
        self._rollback_requested = True

    def emit_event(self, event: dict[str, Any]) -> None:
        """Hand an event record (``{"step": ..., kind: {...}}``) to every callback's ``on_event``."""
        for callback in self.callbacks:
            callback.on_event(self, event)

    def checkpoint_parts(self) -> dict[str, Any]:
        """The loop's own parts with state, for the checkpoint manager (besides the engine)."""
        parts: dict[str, Any] = {"trainer": self.state, "loader": self.batches, "quarantine": self.quarantine}
        for callback in self.callbacks:
            if hasattr(callback, "state_dict"):
                parts[f"callback.{type(callback).__name__}"] = callback
        return parts

    # -- one step ----------------------------------------------------------------------
    def next_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This step's micro-batches, passing over quarantined global batches; every rank draws them,
        so all iterators stay in step."""
        wait_start = time.perf_counter()
        while True:
            self.batch_position = self.batches.stream_position() if hasattr(self.batches, "stream_position") else None
            micro_batches = [next(self.batches) for _ in range(self.num_microbatches)]
            if self.batch_position not in self.quarantine:
                break
            if self.ctx.rank == 0:
                log.warning(f"step {self.state.step + 1}: passing over the quarantined global batch at "
                            f"(epoch, sample) {self.batch_position}")
        self._count_data_wait(time.perf_counter() - wait_start)
        return micro_batches

    def train_step(self) -> StepResult:
        """One optimizer step on this rank, timed part by part (the loop's and the benchmarks')."""
        micro_batches = self.next_micro_batches()
        start = time.perf_counter()
        result = self.engine.forward_backward(micro_batches)
        for callback in self.callbacks:
            callback.after_backward(self, result)
        measured = time.perf_counter()
        result = self.engine.measure_gradients(result)
        result = self.engine.optimizer_step(result, skip=self.skip_requested(result))
        end = time.perf_counter()
        self.clock.add("forward_backward", measured - start)
        self.clock.add("optimizer", end - measured)
        self.clock.busy_s += result.compute_s if result.compute_s is not None else measured - start
        self.clock.steps += 1
        return result

    def skip_requested(self, result: StepResult) -> bool:
        """Whether any callback vetoes this step's update (every callback is asked)."""
        return any([callback.skip_update(self, result) for callback in self.callbacks])

    def evaluate(self) -> dict[str, float]:
        """Mean loss over the validation micro-batches (forward only, the same layout)."""
        losses = self.engine.eval_losses(self.val_batches)
        loss = collectives.mean_over_holders(sum(losses) / len(losses) if losses else None)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def _evaluation_due(self) -> bool:
        if self.val_batches is None:
            return False
        step = self.state.step
        return step == self.train_config.max_steps or bool(self.val_every and step % self.val_every == 0)

    # -- the loop ----------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Train to ``train.max_steps``; raises TrainingPreempted after a stop signal's save."""
        cfg, state = self.train_config, self.state
        for callback in self.callbacks:
            callback.on_train_start(self)
        history: list[dict[str, Any]] = []
        self.clock.reset()
        while state.step < cfg.max_steps:
            for callback in self.callbacks:
                callback.on_step_start(self)
            result = self.train_step()
            state.step += 1
            state.consumed_samples += cfg.global_batch_size
            state.consumed_tokens += self.tokens_per_step
            state.skipped_steps += int(result.skipped)
            for callback in self.callbacks:
                callback.on_step_end(self, result)
            if self._rollback_requested:
                self._roll_back()
                history = [m for m in history if m["step"] <= state.step]  # the steps after it run again
                continue
            evaluate = self._evaluation_due()
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps or evaluate:
                if self.ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                metrics = self._metrics(result)
                if evaluate:
                    metrics.update(self.evaluate())
                history.append(metrics)
                for callback in self.callbacks:
                    callback.on_log(self, metrics)
                self.clock.reset()
                if self.preemption is not None:
                    self.preemption.step_time_s = metrics["step_time_s"]
            self._checkpoint_after_step()
        if self.checkpointer is not None:
            self._announce(self.checkpointer.wait())
        return history

    def _roll_back(self) -> None:
        """Reload the newest checkpoint (weights, optimizer, loader position, counters) on every rank."""
        self._rollback_requested = False
        path = None
        if self.checkpointer is not None:
            self._announce(self.checkpointer.wait())
            path = self.checkpointer.latest()
        if path is None:
            if self.ctx.rank == 0:
                log.warning("rollback requested but there is no checkpoint yet; going on")
            return
        self.checkpointer.load(path, self.engine, self.checkpoint_parts())
        for callback in self.callbacks:
            callback.on_rollback(self)
        self.clock.reset()
        if self.ctx.rank == 0:
            log.warning(f"rolled back to {path} (step {self.state.step})")

    def _count_data_wait(self, waited_s: float) -> None:
        """The first fetch of a process is the loader's one-time start (epoch shuffle, first
        shards): logged once, kept out of the steady-state data-wait metric."""
        if self._loader_started:
            self.clock.add("data_wait", waited_s)
            self.clock.busy_s += waited_s
            return
        self._loader_started = True
        if self.ctx.rank == 0:
            log.info(f"data loader: first micro-batches after {waited_s:.2f}s")

    def _checkpoint_after_step(self) -> None:
        if self.checkpointer is None:
            return
        step, last = self.state.step, self.state.step == self.train_config.max_steps
        signum = self.preemption.requested() if self.preemption is not None else None
        start = time.perf_counter()
        self._announce(self.checkpointer.poll())
        every = self.checkpoint_every
        if signum is not None or (every and (step % every == 0 or last)):
            # The last step's and a preemption's save block: the process is about to exit.
            self.checkpointer.save(step, self.engine, self.checkpoint_parts(), blocking=signum is not None or last)
            self._announce(self.checkpointer.poll())
        self.clock.add("checkpoint", time.perf_counter() - start)
        if signum is not None:
            from kiln.trainer.preemption import TrainingPreempted

            raise TrainingPreempted(step, signum)

    def _announce(self, published: list[int]) -> None:
        for step in published:
            for callback in self.callbacks:
                callback.on_checkpoint_saved(self, step)

    def _metrics(self, result: StepResult) -> dict[str, Any]:
        """The logged record (units in the README's metrics table); collective."""
        timing = self.clock.window_metrics()
        metrics: dict[str, Any] = {
            "step": self.state.step,
            "loss": self.global_loss(result),
            "lr": self.engine.lr,
            "grad_norm": result.grad_norm,
            "tokens": self.state.consumed_tokens,
            **throughput_metrics(self.tokens_per_step, timing["step_time_s"], self.ctx.layout.world_size,
                                 self.flops_per_token, self.peak_flops),
            **timing,
            **memory_metrics(self.ctx.device),
        }
        for callback in self.callbacks:
            metrics.update(callback.metrics(self))
        if self.state.skipped_steps:
            metrics["skipped_steps"] = self.state.skipped_steps
        if result.loss_scale is not None:
            metrics["loss_scale"] = result.loss_scale
        return metrics

    def close(self) -> None:
        for callback in self.callbacks:
            callback.close()
