"""Side concerns around the loop, as callbacks that run on every rank.

Every hook is called on every rank, in the same order; a callback decides itself whether it
acts on rank 0 only (the console, metrics.jsonl and W&B sinks do) or everywhere (a loss-spike
guard must: every rank has to skip the same update). A callback with state (the W&B run id)
exposes ``state_dict``/``load_state_dict`` and is saved in every checkpoint.

Hooks, in the order a step calls them:

* ``on_train_start(trainer)``: after a resume, before the first step;
* ``on_step_start(trainer)``;
* ``skip_update(trainer, result) -> bool``: the gradients are ready, the weights have not moved;
  any callback answering True makes the engine drop this step's update. A callback that decides
  from the loss must decide the same on every rank: ``trainer.global_loss(result)`` is the same
  everywhere (it is a collective, so call it on every rank);
* ``on_step_end(trainer, result)``: the update is applied (or skipped); ``trainer.request_rollback()``
  here makes the trainer reload the newest checkpoint before the next step;
* ``on_log(trainer, metrics)``: on logged steps, the same metrics dict on every rank;
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

    def skip_update(self, trainer, result) -> bool:
        return False

    def on_step_end(self, trainer, result) -> None:
        pass

    def on_log(self, trainer, metrics: dict[str, Any]) -> None:
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
            + (f" | data wait {m['data_wait_frac'] * 100:.1f}%" if m.get("data_wait_frac") is not None else "")
            + (f" | skipped {m['skipped_steps']}" if m.get("skipped_steps") else "")
            + (f" | val loss {m['val_loss']:.4f}" if "val_loss" in m else "")
        )


class JsonlLogger(Callback):
    """One JSON object per logged step in ``metrics.jsonl``, appended and flushed (a crash loses
    nothing logged), on rank 0. On resume, records past the checkpoint are dropped: those steps
    are run again."""

    def __init__(self, rank: int, path: Path) -> None:
        self.rank, self.path = rank, path
        self.file = None

    def on_train_start(self, trainer) -> None:
        if self.rank != 0:
            return
        keep_records_through(self.path, trainer.state.step)
        self.file = open(self.path, "a", buffering=1)

    def on_log(self, trainer, m: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(m) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def keep_records_through(path: Path, step: int) -> None:
    """Drop metrics.jsonl records past ``step`` (written atomically)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def new_wandb_run_id() -> str:
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits  # the alphabet of W&B's own run ids
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbLogger(Callback):
    """W&B run in the run directory, on rank 0; offline mode needs no network and no API key.

    Its run id is checkpointed, so a resumed run continues the same W&B run.
    """

    def __init__(self, rank: int, *, mode: str, project: str, entity: str | None, name: str, run_dir: Path,
                 config: dict) -> None:
        self.rank, self.mode, self.project, self.entity = rank, mode, project, entity
        self.name, self.run_dir, self.config = name, run_dir, config
        self.run_id = new_wandb_run_id()
        self.run = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id

    def on_train_start(self, trainer) -> None:
        if self.rank != 0:
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            mode=self.mode, project=self.project, entity=self.entity, name=self.name, dir=str(self.run_dir),
            config=self.config, id=self.run_id, resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        log.info(f"W&B {self.mode}: {Path(self.run.dir).parent}"
                 + (" (upload later with `wandb sync`)" if self.mode == "offline" else ""))

    def on_log(self, trainer, m: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"): v
                          for k, v in m.items() if k != "step"}, step=m["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def build_callbacks(logging_config, *, rank: int, run_dir: Path, max_steps: int, run_config: dict) -> list[Callback]:
    """The metric sinks of ``logging:``; every rank gets them (each acts on rank 0 only), but the
    progress line (no collectives in it), which only rank 0 gets, on a terminal."""
    from kiln.trainer.progress import progress_callbacks

    callbacks: list[Callback] = [ConsoleLogger(rank, max_steps), JsonlLogger(rank, run_dir / "metrics.jsonl"),
                                 *progress_callbacks(logging_config.progress, rank=rank, max_steps=max_steps)]
    if logging_config.wandb != "disabled":
        callbacks.append(WandbLogger(rank, mode=logging_config.wandb, project=logging_config.wandb_project,
                                     entity=logging_config.wandb_entity, name=run_dir.name, run_dir=run_dir,
                                     config=run_config))
    return callbacks
