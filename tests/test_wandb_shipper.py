"""The W&B shipper without torchrun: metrics.jsonl → W&B rows, each step once, across rewrites,
torn files and new launches (kiln.observe). The kill-and-restart run through the CLI is in
test_wandb_cli.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kiln.config import LoggingConfig, config_from_dict
from kiln.errors import KilnConfigError
from kiln.observe.metrics_tail import MetricsTail
from kiln.observe.wandb_records import history_rows, last_logged_step, transaction_logs
from kiln.observe.wandb_run import run_id_for, server_last_step
from kiln.observe.wandb_shipper import (SHIPPED_BY_LAUNCHER, RankZeroWandbShipper, StepLedger, WandbShipper,
                                        launcher_shipper, wandb_row, wandb_shipper)
from kiln.trainer.callbacks import build_callbacks, keep_records_through

GUARD_EVENT = {"step": 7, "guard": {"kind": "spike", "metric": "loss", "value": 9.1, "zscore": 6.2,
                                    "action": "rollback", "batches": [[0, 96]]}}


def write_records(path: Path, records: list[dict], mode: str = "a") -> None:
    with open(path, mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def step_record(step: int, **extra) -> dict:
    return {"step": step, "loss": 10.0 / step, "lr": 1e-3, **extra}


class FakeRun:
    """What the shipper calls on a W&B run, recorded."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []
        self.finished = False

    def log(self, row: dict, step: int) -> None:
        self.logged.append((step, row))

    def finish(self) -> None:
        self.finished = True


def test_record_to_row_mapping():
    assert wandb_row({"step": 3, "loss": 2.5, "val_loss": 2.7, "mfu": None, "tokens_per_s": 100}) == {
        "train/loss": 2.5, "val/loss": 2.7, "train/tokens_per_s": 100}
    assert wandb_row(GUARD_EVENT) == {"guard/kind": "spike", "guard/metric": "loss", "guard/value": 9.1,
                                      "guard/zscore": 6.2, "guard/action": "rollback", "guard/batches": "[[0, 96]]"}


def test_ledger_ships_later_steps_new_keys_of_the_last_step_and_drops_earlier_steps():
    ledger = StepLedger()
    assert ledger.admit(1, {"train/loss": 1.0}) == {"train/loss": 1.0}
    assert ledger.admit(2, {"train/loss": 0.5}) == {"train/loss": 0.5}
    assert ledger.admit(2, {"train/loss": 0.6, "guard/kind": "spike"}) == {"guard/kind": "spike"}
    assert ledger.admit(2, {"guard/kind": "spike"}) == {}
    assert ledger.admit(1, {"train/loss": 1.1, "val/loss": 3.0}) == {}
    # After catch-up, the last step W&B holds is an earlier session's row: closed to new keys.
    caught_up = StepLedger(shipped_through=5)
    assert caught_up.admit(5, {"guard/kind": "spike"}) == {}
    assert caught_up.admit(6, {"train/loss": 0.1}) == {"train/loss": 0.1}


def test_tail_reads_complete_lines_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert list(tail.new_records()) == []  # no file yet
    write_records(path, [step_record(1)])
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a line being written (or torn by a kill)
    assert [r["step"] for r in tail.new_records()] == [1]
    assert list(tail.new_records()) == []
    with open(path, "a") as f:
        f.write('ss": 5.0}\n')
    assert list(tail.new_records()) == [{"step": 2, "loss": 5.0}]


def test_tail_rereads_a_file_replaced_or_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    write_records(path, [step_record(s) for s in range(1, 7)])
    assert [r["step"] for r in tail.new_records()] == [1, 2, 3, 4, 5, 6]
    keep_records_through(path, 4)  # what a resume from the step-4 checkpoint does: rename over it
    write_records(path, [step_record(5)])
    assert [r["step"] for r in tail.new_records()] == [1, 2, 3, 4, 5]
    with open(path, "r+") as f:  # cut short in place (same file)
        f.truncate(0)
    write_records(path, [step_record(9)])
    assert [r["step"] for r in tail.new_records()] == [9]


def test_shipper_ships_each_step_once_across_a_restart_and_merges_a_guard_event(tmp_path):
    path = tmp_path / "metrics.jsonl"
    run = FakeRun()
    shipper = WandbShipper(path, lambda: (run, None))
    ledger = StepLedger()
    write_records(path, [step_record(s) for s in range(1, 7)])
    shipper.ship_new_records(run, ledger)
    # Workers killed after step 6; the restart resumes from step 4 and runs 5 and 6 again.
    keep_records_through(path, 4)
    write_records(path, [step_record(5, loss=99.0), step_record(6), step_record(7), GUARD_EVENT, step_record(8)])
    shipper.ship_new_records(run, ledger)
    assert [step for step, _ in run.logged] == [1, 2, 3, 4, 5, 6, 7, 7, 8]
    assert dict(run.logged)[5]["train/loss"] == 2.0  # the first run's value stays
    assert run.logged[7] == (7, wandb_row(GUARD_EVENT))  # merged into step 7's row


def test_a_rollback_event_waits_for_the_steps_that_run_again(tmp_path):
    """The guard rolls back from step 7 to the step-4 checkpoint: its event (step 7) is in the file
    before steps 5 and 6 are written again; shipped first, it would close W&B's history to them."""
    path = tmp_path / "metrics.jsonl"
    run = FakeRun()
    shipper = WandbShipper(path, lambda: (run, None))
    ledger = StepLedger()
    write_records(path, [step_record(s) for s in range(1, 5)] + [GUARD_EVENT])  # steps 5, 6 not yet read
    shipper.ship_new_records(run, ledger)
    keep_records_through(path, 4)
    write_records(path, [step_record(5), step_record(6), step_record(7), step_record(8)])
    shipper.ship_new_records(run, ledger)
    assert [step for step, _ in run.logged] == [1, 2, 3, 4, 5, 6, 7, 7, 8]
    assert run.logged[6] == (7, wandb_row(GUARD_EVENT))
    stopped = FakeRun()  # a stop event (the last record of a run) ships with the final pass
    shipper = WandbShipper(tmp_path / "stopped.jsonl", lambda: (stopped, None))
    write_records(tmp_path / "stopped.jsonl", [step_record(6), GUARD_EVENT])
    ledger = StepLedger()
    shipper.ship_new_records(stopped, ledger)
    assert [step for step, _ in stopped.logged] == [6]  # the event waits for a later step record
    shipper.ship_new_records(stopped, ledger, last=True)
    assert [step for step, _ in stopped.logged] == [6, 7]


def test_stop_ships_what_the_file_holds_then_finishes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    run = FakeRun()
    shipper = WandbShipper(path, lambda: (run, 2), poll_s=3600).start()  # polls never come: stop must drain
    write_records(path, [step_record(s) for s in range(1, 5)])
    shipper.stop()
    assert [step for step, _ in run.logged] == [3, 4] and run.finished


def test_run_id_is_created_once_and_taken_from_an_old_checkpoint(tmp_path):
    fresh = tmp_path / "fresh"
    run_id = run_id_for(fresh, fresh / "checkpoints")
    assert len(run_id) == 8 and run_id_for(fresh, fresh / "checkpoints") == run_id
    assert (fresh / "wandb" / "run_id").read_text() == run_id + "\n"
    assert [p.name for p in (fresh / "wandb").iterdir()] == ["run_id"]  # no temporary left
    old = tmp_path / "old"
    for step, saved_id in ((4, "older111"), (8, "oldrun22")):
        (old / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (old / "checkpoints" / f"step_{step:06d}" / "kiln.json").write_text(
            json.dumps({"parts": {"callback.WandbLogger": {"run_id": saved_id}}}))
    assert run_id_for(old, old / "checkpoints") == "oldrun22"


def test_server_last_step_of_a_resumed_online_run():
    class Resumed:
        starting_step = 43  # the server's next step
        summary = {"_step": 42}

    class New:
        starting_step = 0
        summary = {}

    assert server_last_step(Resumed()) == 42 and server_last_step(New()) is None


def test_only_the_first_node_launcher_ships(monkeypatch, tmp_path):
    config = config_from_dict({}, [f"train.run_dir={tmp_path}"])
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert launcher_shipper(config) is None
    monkeypatch.setenv("SLURM_NODEID", "0")
    config.logging.wandb = "disabled"
    assert launcher_shipper(config) is None


def test_wandb_tags_are_checked():
    with pytest.raises(KilnConfigError, match="logging.wandb_tags"):
        config_from_dict({}, ["logging.wandb_tags=[ok, " + "x" * 65 + "]"])


# -- with wandb itself (offline) -----------------------------------------------------------------


def ship_offline(run_dir: Path, records: list[dict], logging_config: LoggingConfig | None = None) -> None:
    """One launch's shipper over metrics.jsonl as it is now, to an offline W&B run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_records(run_dir / "metrics.jsonl", records, mode="w")
    config = logging_config or LoggingConfig(wandb="offline")
    wandb_shipper(config, run_dir, {"train": {"max_steps": 10}}).start().stop()


def offline_history(run_dir: Path) -> list[list[tuple[int, dict]]]:
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    return [list(history_rows(path)) for path in transaction_logs(run_dir / "wandb", run_id)]


def test_a_new_launch_ships_only_what_earlier_offline_sessions_lack(tmp_path):
    run_dir = tmp_path / "run"
    ship_offline(run_dir, [step_record(s) for s in range(1, 301)])
    ship_offline(run_dir, [step_record(s) for s in range(1, 306)] + [{**GUARD_EVENT, "step": 305}])
    first_log = transaction_logs(run_dir / "wandb", run_id_for(run_dir, run_dir / "checkpoints"))[0]
    assert first_log.stat().st_size > 2 * 32 * 1024  # records split over W&B's 32 KiB blocks were read back
    first, second = offline_history(run_dir)
    assert [step for step, _ in first] == list(range(1, 301))
    assert [step for step, _ in second] == list(range(301, 306))
    assert float(first[9][1]["train/loss"]) == 1.0 and second[-1][1]["guard/kind"] == '"spike"'


def test_a_torn_transaction_log_reads_up_to_the_tear(tmp_path):
    run_dir = tmp_path / "run"
    ship_offline(run_dir, [step_record(s) for s in range(1, 11)])
    run_id = run_id_for(run_dir, run_dir / "checkpoints")
    [log_path] = transaction_logs(run_dir / "wandb", run_id)
    data = log_path.read_bytes()
    assert [step for step, _ in history_rows(log_path)] == list(range(1, 11))
    # A service killed while writing the last row: the rows before it stand.
    log_path.write_bytes(data[:data.rindex(b"train/loss")])
    assert [step for step, _ in history_rows(log_path)] == list(range(1, 10))
    assert last_logged_step(run_dir / "wandb", run_id) == 9
    # A flipped byte fails the CRC: reading stops before that record.
    damaged = bytearray(data)
    damaged[data.index(b"train/loss")] ^= 0xFF
    log_path.write_bytes(bytes(damaged))
    assert list(history_rows(log_path)) == []


def test_without_a_launcher_rank_0_ships_from_its_own_process(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_records(run_dir / "metrics.jsonl", [step_record(s) for s in range(1, 4)])
    logging_config = LoggingConfig(wandb="offline")
    monkeypatch.setenv(SHIPPED_BY_LAUNCHER, "1")
    shipping = [c for c in build_callbacks(logging_config, rank=0, run_dir=run_dir, max_steps=3, run_config={})
                if isinstance(c, RankZeroWandbShipper)]
    assert shipping == []  # the launcher ships
    monkeypatch.delenv(SHIPPED_BY_LAUNCHER)
    callbacks = {rank: build_callbacks(logging_config, rank=rank, run_dir=run_dir, max_steps=3, run_config={})[-1]
                 for rank in (0, 1)}
    for callback in callbacks.values():
        callback.on_train_start(trainer=None)
        callback.close()
    assert callbacks[1].shipper is None
    assert [[step for step, _ in rows] for rows in offline_history(run_dir)] == [[1, 2, 3]]


def test_online_without_an_api_key_logs_offline_after_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="kiln"):
        ship_offline(run_dir, [step_record(s) for s in range(1, 4)], LoggingConfig(wandb="online"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no API key" in warnings[0] and "offline" in warnings[0], warnings
    assert [[step for step, _ in rows] for rows in offline_history(run_dir)] == [[1, 2, 3]]
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_the_api_key_is_never_written_into_the_run_directory(tmp_path, monkeypatch, caplog):
    key = "kilnfakekey" + "0123456789" * 3  # 40 characters, as W&B keys are
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # online, but nothing listens there
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="kiln"):
        ship_offline(run_dir, [step_record(s) for s in range(1, 4)], LoggingConfig(wandb="online", wandb_tags=["t"]))
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    leaked = [p for p in files if key.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"
