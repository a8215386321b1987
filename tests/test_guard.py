"""The loss-spike and NaN guard: its verdicts, skip on every rank, rollback parity, the retry cap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.config import GuardConfig, config_from_dict
from kiln.errors import KilnConfigError
from kiln.observe.wandb_records import history_rows, transaction_logs
from kiln.trainer.guard import EXIT_GUARD_STOPPED, LossGuard, resolve_policy
from kiln.trainer.loop import Quarantine
from tests.distributed import run_distributed
from tests.kiln_run import TINY, kiln, read_events, read_metrics

BAD_BATCH = 17  # the global batch of step 18: after the guard's window has filled
GLOBAL_BATCH = 16  # tiny.yaml's
ROLLBACK_SETTINGS = ("train.log_every=1", "logging.wandb=disabled", "data.shuffle=false", "optim.warmup_steps=5",
                     "train.max_steps=24", "checkpoint.every=5", "guard.window=8", "guard.policy=rollback")


def _guard(**settings) -> LossGuard:
    return LossGuard(GuardConfig(**settings), policy="skip", rank=1, run_dir=Path("/nonexistent"))


def test_verdicts_nonfinite_always_spikes_once_the_window_is_full():
    guard = _guard(window=4, zscore=3.0)
    assert guard._judge(float("nan"), 1.0)["kind"] == "nonfinite"
    assert guard._judge(2.0, float("inf")) == {"kind": "nonfinite", "metric": "grad_norm", "value": float("inf")}
    assert guard._judge(50.0, 1.0) is None  # no window yet: nothing to call a spike against
    guard.history.extend([(2.0, 1.0), (2.1, 1.1), (1.9, 0.9)])
    assert guard._judge(50.0, 1.0) is None  # 3 of 4
    guard.history.append((2.0, 1.0))
    spike = guard._judge(50.0, 1.0)
    assert spike["kind"] == "spike" and spike["metric"] == "loss" and spike["zscore"] > 3
    assert guard._judge(2.0, 30.0)["metric"] == "grad_norm"
    assert guard._judge(1.0, 0.1) is None  # far below the mean is fine: only upward spikes count
    flat = _guard(window=2, zscore=3.0)
    flat.history.extend([(2.0, 1.0), (2.0, 1.0)])
    assert flat._judge(2.05, 1.0) is None  # a zero-deviation window: 1% of the mean is the least deviation
    assert flat._judge(2.1, 1.0)["zscore"] == pytest.approx(5.0)


def test_guard_state_restores_the_window_and_keeps_the_longer_cooldown():
    guard = _guard(window=3)
    guard.history.extend([(1.0, 1.0)] * 3)
    guard.cooldown_until = 40
    guard.load_state_dict({"history": [[2.0, 0.5]], "cooldown_until": 12})
    assert list(guard.history) == [(2.0, 0.5)] and guard.cooldown_until == 40


def test_quarantine_loads_by_merging():
    """A rollback loads a checkpoint older than the batch it quarantined: the quarantine must survive."""
    quarantine = Quarantine()
    quarantine.add((0, 272))
    quarantine.load_state_dict({"positions": [[1, 16]]})
    assert (0, 272) in quarantine and (1, 16) in quarantine and (0, 16) not in quarantine
    assert quarantine.state_dict() == {"positions": [(0, 272), (1, 16)]}


def test_policy_defaults_to_what_the_engine_can_do():
    from kiln.engine import engine_class

    assert resolve_policy(GuardConfig(), engine_class("megatron")) == "skip"
    assert resolve_policy(GuardConfig(), engine_class("deepspeed")) == "rollback"
    with pytest.raises(KilnConfigError, match="guard.policy=skip: the deepspeed engine cannot drop an update"):
        config_from_dict({}, ["parallel.engine=deepspeed", "guard.policy=skip"])
    with pytest.raises(KilnConfigError, match="guard.window must be >= 2"):
        GuardConfig(window=1)


# -- skip: the update is dropped on every rank --------------------------------------------------------
def _train_with_a_nan_at_step_3(rank: int, run_dir: Path) -> dict:
    from kiln.parallel.backend import destroy_parallel, init_parallel
    from kiln.train import build_run_engine
    from kiln.trainer.callbacks import Callback
    from kiln.trainer.loop import Trainer
    from tests.test_engines import _CountingBatches

    config = config_from_dict({}, ["model.vocab_size=256", "train.precision=fp32", "train.device=cpu",
                                   "train.max_steps=5", "train.log_every=1", "train.micro_batch_size=2",
                                   "train.global_batch_size=4", "optim.warmup_steps=2", "logging.wandb=disabled",
                                   "guard.inject_nan_grad_at=[3]"])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    engine = build_run_engine(config, ctx, 256)
    seen: dict = {"weights": {}, "lr": {}, "adam_step": {}, "skipped": {}}

    class Snapshot(Callback):
        def on_step_end(self, trainer, result):
            step = trainer.state.step
            seen["weights"][step] = float(sum(p.detach().double().sum() for m in engine.model_parts for p in m.parameters()))
            seen["lr"][step] = engine.lr
            seen["adam_step"][step] = engine.state_dict()["adam_step"]
            seen["skipped"][step] = result.skipped

        def on_event(self, trainer, event):
            seen.setdefault("events", []).append(event)

    guard = LossGuard(config.guard, policy="skip", rank=ctx.rank, run_dir=run_dir)
    trainer = Trainer(train=config.train, data=config.data, seq_len=config.model.seq_len, ctx=ctx, engine=engine,
                      batches=_CountingBatches(ctx.coords["dp"], 128), callbacks=[guard, Snapshot()])
    trainer.train()
    destroy_parallel()
    return seen


def test_skip_drops_the_update_on_every_rank(tmp_path):
    ranks = run_distributed(_train_with_a_nan_at_step_3, 2, tmp_path)
    for seen in ranks:
        assert [seen["skipped"][s] for s in range(1, 6)] == [False, False, True, False, False]
        assert seen["weights"][3] == seen["weights"][2]  # no update: not one weight moved
        assert seen["adam_step"][3] == seen["adam_step"][2] and seen["adam_step"][4] == seen["adam_step"][2] + 1
        assert seen["weights"][4] != seen["weights"][3] and all(math.isfinite(w) for w in seen["weights"].values())
        assert seen["events"] == [{"step": 3, "guard": {"kind": "nonfinite", "metric": "grad_norm",
                                                        "value": pytest.approx(float("nan"), nan_ok=True),
                                                        "action": "skip"}}]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # every replica skipped the same update
    assert [json.loads(line)["step"] for line in (tmp_path / "guard.jsonl").read_text().splitlines()] == [3]


# -- rollback: the replay trains as if the bad batch had never been in the data -----------------------
@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, str]:
    """The first 32 global batches of the bundled data, unshuffled: as they are (clean), with global
    batch BAD_BATCH replaced by random tokens (planted), and with it cut out (without)."""
    from streaming import StreamingDataset

    from kiln.data.bundled import ensure_bundled_dataset
    from kiln.data.pack import read_meta, write_samples_to_mds

    root = tmp_path_factory.mktemp("guard-data")
    source = ensure_bundled_dataset(128, str(root / "cache"))
    stream = StreamingDataset(local=source, batch_size=1, shuffle=False)
    samples = [stream[i]["tokens"] for i in range(32 * GLOBAL_BATCH)]
    bad = range(BAD_BATCH * GLOBAL_BATCH, (BAD_BATCH + 1) * GLOBAL_BATCH)
    noise = np.random.default_rng(0).integers(0, 4096, (len(bad), 129)).astype(samples[0].dtype)
    variants = {"clean": samples,
                "planted": [noise[i - bad.start] if i in bad else s for i, s in enumerate(samples)],
                "without": [s for i, s in enumerate(samples) if i not in bad]}
    meta = {k: v for k, v in read_meta(source).items() if k in ("eos_id", "tokenizer_sha256")}
    for name, variant in variants.items():
        write_samples_to_mds(iter(variant), str(root / name), sample_len=129, vocab_size=4096, meta=meta)
    return {name: str(root / name) for name in variants} | {"cache": str(root / "cache")}


def _train(run_dir: Path, datasets: dict, data: str, *overrides: str) -> list[dict]:
    kiln("train", TINY, "--nproc-per-node", "2", f"train.run_dir={run_dir}", f"data.path={datasets[data]}",
         *ROLLBACK_SETTINGS, *overrides, cache_dir=Path(datasets["cache"]))
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def without_the_bad_batch(datasets, tmp_path_factory) -> list[dict]:
    return _train(tmp_path_factory.mktemp("without"), datasets, "without")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["planted batch", pytest.param("nan gradients", marks=pytest.mark.extended)])
def test_rollback_replays_as_if_the_bad_batch_was_never_there(fault, datasets, without_the_bad_batch, tmp_path):
    run_dir = tmp_path / "run"
    if fault == "planted batch":
        metrics = _train(run_dir, datasets, "planted", "logging.wandb=offline")
    else:
        metrics = _train(run_dir, datasets, "clean", "guard.inject_nan_grad_at=[18]")
    # Bitwise the losses and gradient norms of the run whose data never held that batch, every step.
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in metrics] == \
           [(m["step"], m["loss"], m["grad_norm"]) for m in without_the_bad_batch]
    (event,) = [json.loads(line) for line in (run_dir / "guard.jsonl").read_text().splitlines()]
    expected = {"kind": "spike", "metric": "loss"} if fault == "planted batch" else \
               {"kind": "nonfinite", "metric": "grad_norm"}
    assert event["step"] == BAD_BATCH + 1
    assert event["guard"].items() >= {**expected, "action": "rollback", "batch": [0, BAD_BATCH * GLOBAL_BATCH],
                                      "batch_index": BAD_BATCH}.items()
    assert read_events(run_dir) == [json.loads(json.dumps(event))]  # metrics.jsonl holds it too, once
    if fault == "planted batch":  # and W&B: the event and the replayed step merge into one row
        (log,) = transaction_logs(run_dir / "wandb", (run_dir / "wandb" / "run_id").read_text().strip())
        rows = list(history_rows(log))
        assert [step for step, _ in rows] == list(range(1, 25))
        row = dict(rows)[BAD_BATCH + 1]
        assert json.loads(row["guard/kind"]) == "spike" and json.loads(row["guard/action"]) == "rollback"
        assert json.loads(row["train/loss"]) == metrics[BAD_BATCH]["loss"]
    # The quarantine went into the checkpoints written after the rollback, so a restart passes the batch too.
    final = json.loads((run_dir / "checkpoints" / "step_000024" / "kiln.json").read_text())
    assert final["parts"]["quarantine"] == {"positions": [[0, BAD_BATCH * GLOBAL_BATCH]]}


@pytest.mark.slow
def test_retry_cap_stops_a_run_whose_every_step_is_bad(tmp_path):
    result = kiln("train", TINY, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=8", "logging.wandb=disabled",
                  "checkpoint.every=0", "guard.max_retries=2", "guard.inject_nan_grad_at=[1,2,3,4,5,6,7,8]",
                  cache_dir=tmp_path / "cache", check=False)
    assert result.returncode == EXIT_GUARD_STOPPED, result.stderr[-3000:]
    assert "loss guard: 3 bad steps" in result.stderr and "guard.max_retries=2" in result.stderr
    assert "Traceback" not in result.stderr
    events = [json.loads(line)["guard"]["action"] for line in (tmp_path / "run" / "guard.jsonl").read_text().splitlines()]
    assert events == ["skip", "skip", "stop"]


def test_lr_cooldown_after_a_rollback_scales_the_scheduled_lr():
    from types import SimpleNamespace

    from kiln.engine.base import Engine

    guard = _guard(lr_cooldown_steps=2, lr_cooldown_factor=0.25)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = SimpleNamespace(step=lambda increment: optimizer.param_groups[0].update(lr=0.8))
    engine = SimpleNamespace(optimizer=optimizer, scheduler=scheduler, lr_multiplier=1.0)
    trainer = SimpleNamespace(engine=engine, state=SimpleNamespace(step=10))
    guard.on_rollback(trainer)  # rolled back to step 10: steps 11 and 12 run cooled
    seen = []
    for step in (10, 11, 12):
        trainer.state.step = step
        guard.on_step_start(trainer)
        Engine.advance_lr_schedule(engine)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == [pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.8)]
