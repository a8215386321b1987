"""Side concerns around the loop, as callbacks that run on every rank.

Every hook is called on every rank, in the same order; a callback decides itself whether it
acts on rank 0 only (the console, metrics.jsonl and W&B sinks do) or everywhere (a loss-spike
guard must: every rank has to skip the same update). A callback with state exposes
``state_dict``/``load_state_dict`` and is saved in every checkpoint.

Hooks, in the order a step calls them:

* ``on_train_start(trainer)``: after a resume, before the first step;
* ``on_step_start(trainer)``;
* ``after_backward(trainer, result)``: the gradients are accumulated and reduced, not yet measured;
* ``skip_update(trainer, result) -> bool``: the gradients are ready and measured (``result.grad_norm``,
  where the engine's ``grad_norm_before_update``), the weights have not moved;
  any callback answering True makes the engine drop this step's update. A callback that decides
  from the loss must decide the same on every rank: ``trainer.global_loss(result)`` is the same
  everywhere (it is a collective, so call it on every rank);
* ``on_step_end(trainer, result)``: the update is applied (or skipped); ``trainer.request_rollback()``
  here makes the trainer reload the newest checkpoint before the next step;
* ``on_rollback(trainer)``: a rollback has reloaded the newest checkpoint (``trainer.state.step`` is its
  step; the steps after it run again);
* ``on_log(trainer, metrics)``: on logged steps, the same metrics dict on every rank;
* ``on_event(trainer, event)``: a callback reported an event (``trainer.emit_event``; the guard's);
* ``on_checkpoint_saved(trainer, step)``: a checkpoint of ``step`` is published;
* ``close()``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("kiln")


class Callback:
    def on_train_start(self, trainer) -> None:
        pass

    def on_step_start(self, trainer) -> None:
        pass

    def after_backward(self, trainer, result) -> None:
        pass

    def skip_update(self, trainer, result) -> bool:
        return False

    def on_step_end(self, trainer, result) -> None:
        pass

    def on_rollback(self, trainer) -> None:
        pass

    def metrics(self, trainer) -> dict[str, Any]:
        """Values this callback adds to a logged step's record (called on every rank: may be collective)."""
        return {}

    def on_log(self, trainer, metrics: dict[str, Any]) -> None:
        pass

    def on_event(self, trainer, event: dict[str, Any]) -> None:
        pass

    def on_checkpoint_saved(self, trainer, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleLogger(Callback):
    """One line per logged step, on rank 0."""

    def __init__(self, rank: int, max_steps: int) -> None:
        self.rank, self.width = rank, len(str(max_steps))

    def on_log(self, trainer, m: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        log.info(
            f"step {m['step']:>{self.width}} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | "
            f"grad norm {m['grad_norm']:.3f} | {m['tokens_per_s']:,.0f} tok/s | {m['step_time_s'] * 1000:.0f} ms"
            + (f" | MFU {m['mfu'] * 100:.1f}%" if m.get("mfu") is not None else "")
            + (f" | data wait {m['time_data_wait_s'] / m['step_time_s'] * 100:.1f}%" if m.get("time_data_wait_s") else "")
            + (f" | rank {m['slowest_rank']} {m['step_time_spread']:.2f}× median" if m.get("step_time_spread", 1) > 1.2
               else "")
            + (f" | skipped {m['skipped_steps']}" if m.get("skipped_steps") else "")
            + _moe_summary(m)
            + (f" | val loss {m['val_loss']:.4f}" if "val_loss" in m else "")
        )


def _moe_summary(m: dict[str, Any]) -> str:
    """Routing at a glance: the aux loss, the worst layer's busiest expert over the mean, the mean
    coefficient of variation of expert load (per layer in metrics.jsonl), dropped tokens."""
    if "moe_load_cv" not in m:
        return ""
    return (" | moe" + (f" aux {m['moe_aux_loss']:.3f}" if "moe_aux_loss" in m else "")
            + f" load max/mean {m['moe_load_max_over_mean']:.2f} cv {m['moe_load_cv']:.2f}"
            + (f" dropped {m['moe_dropped_fraction'] * 100:.1f}%" if m.get("moe_dropped_fraction") else ""))


class JsonlLogger(Callback):
    """One JSON object per logged step in ``metrics.jsonl``, appended and flushed (a crash loses
    nothing logged), on rank 0; events (``trainer.emit_event``) are records too. On resume and
    rollback, step records past the checkpoint are dropped (those steps run again); events stay."""

    def __init__(self, rank: int, path: Path) -> None:
        self.rank, self.path = rank, path
        self.file = None

    def on_train_start(self, trainer) -> None:
        if self.rank != 0:
            return
        keep_records_through(self.path, trainer.state.step)
        self.file = open(self.path, "a", buffering=1)

    def on_rollback(self, trainer) -> None:
        self.close()
        self.on_train_start(trainer)

    def on_log(self, trainer, m: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(m) + "\n")

    on_event = on_log

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def is_event(record: dict[str, Any]) -> bool:
    """An event record carries its step and one nested mapping (``{"step": 7, "guard": {...}}``)."""
    return any(isinstance(value, dict) for value in record.values())


def keep_records_through(path: Path, step: int) -> None:
    """Drop metrics.jsonl step records past ``step``, keep every event (written atomically)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the torn last line of a killed writer: that step runs again anyway
            continue
        if record["step"] <= step or is_event(record):
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def build_callbacks(logging_config, *, rank: int, run_dir: Path, max_steps: int, run_config: dict) -> list[Callback]:
    """The metric sinks of ``logging:``; every rank gets them (each acts on rank 0 only), but the
    progress line (no collectives in it), which only rank 0 gets, on a terminal."""
    from kiln.observe.wandb_shipper import RankZeroWandbShipper, shipped_by_launcher
    from kiln.trainer.progress import progress_callbacks

    callbacks: list[Callback] = [ConsoleLogger(rank, max_steps), JsonlLogger(rank, run_dir / "metrics.jsonl"),
                                 *progress_callbacks(logging_config.progress, rank=rank, max_steps=max_steps)]
    if logging_config.wandb != "disabled" and not shipped_by_launcher():  # else the launcher ships metrics.jsonl
        callbacks.append(RankZeroWandbShipper(rank, logging_config, run_dir, run_config))
    return callbacks
