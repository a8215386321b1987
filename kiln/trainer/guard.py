"""The loss-spike and NaN guard: a callback on every rank (``guard:`` in the run config).

A step is bad when its loss or its gradient norm is not finite, or is a spike: more than
``guard.zscore`` standard deviations above the mean of the last ``guard.window`` good steps.
Every rank sees the same loss (averaged over the data-parallel replicas) and the same global
gradient norm, so every rank reaches the same verdict without talking. Then, by ``guard.policy``:

* ``skip``: the step's update is dropped (weights, optimizer state and LR schedule stay as they
  were) and training goes on with the next global batch;
* ``rollback``: the update is dropped, the step's global batch is quarantined, and the trainer
  reloads the newest checkpoint; the replay passes over every quarantined batch, so it trains on
  the stream as if that batch had never been in it. The quarantine is in every later checkpoint,
  so a restart skips the same batches. ``guard.lr_cooldown_steps`` after a rollback run at
  ``guard.lr_cooldown_factor`` × the scheduled LR.

More than ``guard.max_retries`` bad steps before ``guard.window`` good ones have passed stop the
run (:class:`GuardStop`, exit code :data:`EXIT_GUARD_STOPPED`). Every event is a record in
``<run_dir>/guard.jsonl`` and in ``metrics.jsonl`` (hence W&B): ``{"step", "guard": {"kind":
"nonfinite" | "spike", "metric": "loss" | "grad_norm", "value", "zscore", "mean", "std",
"action": "skip" | "rollback" | "stop", "batch": [epoch, sample_in_epoch], "batch_index"}}``.

With the deepspeed engine (no update can be dropped, the gradient norm is known only after the
update) the verdict comes after the step, and the policy is rollback.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from pathlib import Path
from typing import Any

import torch

from kiln.config import GuardConfig
from kiln.errors import KilnError
from kiln.trainer.callbacks import Callback

log = logging.getLogger("kiln")

EXIT_GUARD_STOPPED = 3
MIN_RELATIVE_STD = 0.01
"""A window whose values barely move would make any wiggle a many-sigma spike: deviations are
measured against at least 1% of the window's mean."""
WATCHED = ("loss", "grad_norm")


class GuardStop(KilnError):
    """The retry cap is spent: the run stops (on every rank) instead of skipping or rolling back again."""


def resolve_policy(config: GuardConfig, engine_class) -> str:
    """The policy in force: the configured one, or the engine's default (skip where it can drop an update)."""
    return config.policy or ("skip" if engine_class.can_skip_update else "rollback")


class LossGuard(Callback):
    def __init__(self, config: GuardConfig, *, policy: str, rank: int, run_dir: Path) -> None:
        self.config, self.policy, self.rank = config, policy, rank
        self.events_path = run_dir / "guard.jsonl"
        self.history: deque[tuple[float, float]] = deque(maxlen=config.window)  # (loss, grad_norm) of good steps
        self.cooldown_until = 0  # steps up to this one run at the cooled LR
        self.strikes = 0  # bad steps since the last `window` good ones (process-local, never restored)
        self.good_streak = 0
        self._injected: set[int] = set()
        self._loss: float | None = None
        self._verdict: dict[str, Any] | None = None

    # -- checkpoint state: the window (so a replay decides as the first run did) and the cool-down ---------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(pair) for pair in self.history], "cooldown_until": self.cooldown_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((tuple(pair) for pair in state.get("history", [])), maxlen=self.config.window)
        self.cooldown_until = max(self.cooldown_until, int(state.get("cooldown_until", 0)))

    # -- the hooks ---------------------------------------------------------------------------------------
    def on_step_start(self, trainer) -> None:
        step = trainer.state.step + 1
        trainer.engine.lr_multiplier = self.config.lr_cooldown_factor if step <= self.cooldown_until else 1.0

    def after_backward(self, trainer, result) -> None:
        step = trainer.state.step + 1
        if step in self.config.inject_nan_grad_at and step not in self._injected:
            self._injected.add(step)
            poison_gradients(trainer.engine)
            if self.rank == 0:
                log.warning(f"guard: fire drill, a NaN put into the gradients of step {step} (guard.inject_nan_grad_at)")

    def skip_update(self, trainer, result) -> bool:
        self._loss = trainer.global_loss(result)  # a collective: every rank calls it
        if not trainer.engine.grad_norm_before_update:
            return False  # judged after the update, in on_step_end
        self._verdict = self._judge(self._loss, result.grad_norm)
        return self._verdict is not None

    def on_step_end(self, trainer, result) -> None:
        verdict = self._verdict if trainer.engine.grad_norm_before_update else self._judge(self._loss, result.grad_norm)
        self._verdict = None
        if verdict is None:
            self.history.append((self._loss, result.grad_norm))
            self.good_streak += 1
            if self.good_streak >= self.config.window:
                self.strikes = 0
            return
        self._act(trainer, verdict)

    def on_rollback(self, trainer) -> None:
        if self.config.lr_cooldown_steps:
            self.cooldown_until = trainer.state.step + self.config.lr_cooldown_steps

    # -- the verdict and the action ----------------------------------------------------------------------
    def _judge(self, loss: float, grad_norm: float) -> dict[str, Any] | None:
        """None for a good step, else what was wrong with it."""
        values = {"loss": loss, "grad_norm": grad_norm}
        for metric in WATCHED:
            if not math.isfinite(values[metric]):
                return {"kind": "nonfinite", "metric": metric, "value": values[metric]}
        if len(self.history) < self.config.window:
            return None
        for index, metric in enumerate(WATCHED):
            window = [pair[index] for pair in self.history]
            mean = statistics.fmean(window)
            std = max(statistics.pstdev(window), MIN_RELATIVE_STD * abs(mean), 1e-12)
            zscore = (values[metric] - mean) / std
            if zscore > self.config.zscore:
                return {"kind": "spike", "metric": metric, "value": values[metric], "zscore": zscore,
                        "mean": mean, "std": std}
        return None

    def _act(self, trainer, verdict: dict[str, Any]) -> None:
        step, position = trainer.state.step, trainer.batch_position
        self.strikes += 1
        self.good_streak = 0
        action = "stop" if self.strikes > self.config.max_retries else self.policy
        event = dict(verdict, action=action)
        if position is not None:
            event["batch"] = list(position)
            event["batch_index"] = position[1] // trainer.train_config.global_batch_size
        self._report(trainer, step, event)
        if action == "stop":
            raise GuardStop(
                f"loss guard: {self.strikes} bad steps without {self.config.window} good ones between them "
                f"(guard.max_retries={self.config.max_retries}); the last at step {step}: {verdict['kind']} "
                f"{verdict['metric']} {verdict['value']:.4g}. The run diverges: look at {self.events_path}, lower "
                f"optim.lr or raise optim.warmup_steps, then relaunch (it resumes from the last checkpoint)")
        if action == "rollback":
            if position is not None:
                trainer.quarantine.add(position)
            trainer.request_rollback()

    def _report(self, trainer, step: int, event: dict[str, Any]) -> None:
        record = {"step": step, "guard": event}
        trainer.emit_event(record)
        if self.rank != 0:
            return
        with open(self.events_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        zscore = f" ({event['zscore']:.1f} sigma over {event['mean']:.4g})" if "zscore" in event else ""
        log.warning(f"guard: step {step}: {event['kind']} {event['metric']} {event['value']:.4g}{zscore}; "
                    f"{event['action']}" + (f", global batch {event['batch']} quarantined" if
                                            event["action"] == "rollback" and "batch" in event else ""))


def poison_gradients(engine) -> None:
    """Put a NaN into the first gradient element this rank holds (megatron's main_grad, else .grad)."""
    with torch.no_grad():
        for part in engine.model_parts:
            for param in part.parameters():
                grad = getattr(param, "main_grad", None)
                grad = param.grad if grad is None else grad
                if grad is None:
                    continue
                local = grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP: this rank's shard
                if local.numel():
                    local.view(-1)[0] = float("nan")
                    return
    raise KilnError("guard.inject_nan_grad_at: this engine holds no gradient tensors after backward "
                    "(deepspeed keeps them in its own buffers); run the fire drill with parallel.engine=megatron")
