"""W&B history as durable as metrics.jsonl: a process that outlives the workers ships the file.

Rank 0 appends every logged step to ``<run_dir>/metrics.jsonl`` and flushes it; W&B buffers in
a service process that dies with its owner. So no worker talks to W&B: a shipper thread follows
metrics.jsonl (every ``poll_s``, complete lines only, reopening it when a resume rewrites it)
and logs each record to the run directory's one W&B run. After any kill and restart W&B holds
every step metrics.jsonl holds, once and in order.

**Where it runs.** In the launcher (``kiln train --nproc-per-node N``), which waits for the
elastic agent while workers die and restart; it tells the workers (``KILN_WANDB_SHIPPED_BY_LAUNCHER``)
so rank 0 does not ship too. Multi-node (``--nnodes``): every node has a launcher, and only the
first node's (``SLURM_NODEID`` 0 or unset) ships; the run directory is on a filesystem every
node sees, as the checkpoints already need. Without a launcher (one process ``kiln train CONFIG``,
or a torchrun you start yourself) rank 0 ships from a thread of its own process: a kill of rank
0 then takes the W&B records still buffered with it, and the next start catches up (below).

**Record → W&B row** (``wandb_row``): ``step`` is the W&B step; ``val_<name>`` → ``val/<name>``,
``moe_<name>`` (the MoE routing metrics) → ``moe/<name>``;
a nested object ``<name>: {field: value}`` → ``<name>/<field>`` (the loss-spike guard's events:
``guard/kind``, ``guard/zscore``, ...; deeper objects keep adding ``/<field>``); every other key
→ ``train/<key>``. Numbers and strings go as they are, lists as their JSON text, nulls not at all.

**Each step once** (``StepLedger``; W&B steps only go up): a record whose step is past the last
shipped step is shipped; one at the last shipped step ships only the keys not yet shipped for
that step (W&B merges them into the same row, still open in this session); an earlier step is
dropped: it was shipped before a restart ran it again (W&B keeps the first run's values).

**Catch-up** (a new launch: Slurm requeue, everything killed): the shipper first asks what W&B
already holds (``kiln.observe.wandb_run``) and ships only later steps; that step's row belongs to
an earlier session and takes no more keys. The run is finished (``run.finish()``) after a last
read once the workers are gone, whatever their exit.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.observe.metrics_tail import MetricsTail
from kiln.trainer.callbacks import Callback, is_event

log = logging.getLogger("kiln")

SHIPPED_BY_LAUNCHER = "KILN_WANDB_SHIPPED_BY_LAUNCHER"
FINISH_TIMEOUT_S = 600.0  # a final upload may take a while; a hung W&B service must not hold the job


def wandb_row(record: dict[str, Any]) -> dict[str, Any]:
    """The W&B keys and values of one metrics.jsonl record (its step excluded)."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            _flatten(key, value, row)
        elif value is not None:
            row[_wandb_key(key)] = _plain(value)
    return row


def _wandb_key(key: str) -> str:
    for prefix in ("val", "moe"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"train/{key}"


def _flatten(prefix: str, fields: dict[str, Any], row: dict[str, Any]) -> None:
    for key, value in fields.items():
        if isinstance(value, dict):
            _flatten(f"{prefix}/{key}", value, row)
        elif value is not None:
            row[f"{prefix}/{key}"] = _plain(value)


def _plain(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


class StepLedger:
    """What may still go to W&B: steps only go up, and each key of a step goes once."""

    def __init__(self, shipped_through: int | None = None) -> None:
        self.step = shipped_through
        self.keys: set[str] | None = None  # None: the row of self.step is an earlier session's, closed

    def admit(self, step: int, row: dict[str, Any]) -> dict[str, Any]:
        """The part of ``row`` to log at ``step`` (empty: nothing)."""
        if self.step is None or step > self.step:
            self.step, self.keys = step, set(row)
            return row
        if step == self.step and self.keys is not None:
            new = {key: value for key, value in row.items() if key not in self.keys}
            self.keys |= new.keys()
            return new
        return {}


class WandbShipper:
    """A thread that ships ``metrics_path`` to the run ``open_run()`` returns as ``(run, shipped_through)``."""

    def __init__(self, metrics_path: Path, open_run: Callable[[], tuple[Any, int | None]], poll_s: float = 1.0) -> None:
        self.tail, self.open_run, self.poll_s = MetricsTail(metrics_path), open_run, poll_s
        self.stop_requested = threading.Event()
        self.held_events: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._ship_until_stopped, name="kiln-wandb-shipper", daemon=True)

    def start(self) -> WandbShipper:
        self.thread.start()
        return self

    def stop(self, timeout_s: float = FINISH_TIMEOUT_S) -> None:
        """Ship what the file holds now, finish the run and return (call once the writers are done)."""
        self.stop_requested.set()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning(f"W&B: the final upload did not end within {timeout_s:.0f} s; leaving it "
                        f"(the next launch, or `wandb sync`, ships the rest)")

    def ship_new_records(self, run, ledger: StepLedger, *, last: bool = False) -> None:
        """Ship the file's new records. An event (the guard's) waits for the first step record at or past
        its step: after a rollback the event's step is ahead of the steps that run again, and shipping it
        first would close W&B's history to them. ``last``: the writers are done, ship what waits."""
        for record in self.tail.new_records():
            step = record.get("step")
            if not isinstance(step, int):
                continue
            if is_event(record):
                self.held_events.append(record)
                continue
            self._release_events(run, ledger, through=step)
            self._log(run, ledger, record)
        if last:
            self._release_events(run, ledger, through=None)

    def _release_events(self, run, ledger: StepLedger, through: int | None) -> None:
        due = [event for event in self.held_events if through is None or event["step"] <= through]
        self.held_events = [event for event in self.held_events if event not in due]
        for event in due:
            self._log(run, ledger, event)

    @staticmethod
    def _log(run, ledger: StepLedger, record: dict[str, Any]) -> None:
        if row := ledger.admit(record["step"], wandb_row(record)):
            run.log(row, step=record["step"])

    def _ship_until_stopped(self) -> None:
        try:
            run, shipped_through = self.open_run()
        except Exception as err:  # noqa: BLE001 - W&B must never stop the training
            log.warning(f"W&B: could not open the run ({err}); metrics.jsonl keeps every step "
                        f"and the next launch ships them")
            return
        ledger = StepLedger(shipped_through)
        try:
            while True:
                last_pass = self.stop_requested.is_set()  # set before this read: the writers are done
                self.ship_new_records(run, ledger, last=last_pass)
                if last_pass:
                    break
                self.stop_requested.wait(self.poll_s)
        except Exception as err:  # noqa: BLE001
            log.warning(f"W&B: shipping stopped ({err!r}); the next launch ships the rest")
        finally:
            self.tail.close()
            try:
                run.finish()
            except Exception as err:  # noqa: BLE001
                log.warning(f"W&B: finishing the run failed ({err!r})")


def wandb_shipper(logging_config, run_dir: Path, run_config: dict[str, Any]) -> WandbShipper:
    """The shipper of a run directory's metrics.jsonl to its W&B run (not started)."""
    from kiln.observe.wandb_run import open_run, run_id_for

    checkpoint_dir = run_config.get("checkpoint", {}).get("dir")
    checkpoint_root = Path(checkpoint_dir) if checkpoint_dir else run_dir / "checkpoints"

    def open_this_run():
        return open_run(logging_config, run_dir, run_id_for(run_dir, checkpoint_root), run_config)

    return WandbShipper(run_dir / "metrics.jsonl", open_this_run)


def launcher_shipper(config) -> WandbShipper | None:
    """The launcher's shipper, started; None where W&B is off or another node's launcher ships."""
    if config.logging.wandb == "disabled" or os.environ.get("SLURM_NODEID", "0") != "0":
        return None
    return wandb_shipper(config.logging, Path(config.train.run_dir), config.to_dict()).start()


class RankZeroWandbShipper(Callback):
    """W&B when no launcher ships: rank 0 runs the shipper in a thread of its own process."""

    def __init__(self, rank: int, logging_config, run_dir: Path, run_config: dict[str, Any]) -> None:
        self.rank, self.logging_config, self.run_dir, self.run_config = rank, logging_config, run_dir, run_config
        self.shipper: WandbShipper | None = None

    def on_train_start(self, trainer) -> None:
        if self.rank == 0 and self.shipper is None:  # after metrics.jsonl dropped the steps run again
            self.shipper = wandb_shipper(self.logging_config, self.run_dir, self.run_config).start()

    def close(self) -> None:
        if self.shipper is not None:
            self.shipper.stop()


def shipped_by_launcher() -> bool:
    return os.environ.get(SHIPPED_BY_LAUNCHER) == "1"
