"""The engine interface: the Trainer and each engine below the CLI (on N gloo ranks), and the
fsdp engine through the CLI against the megatron engine.

The fsdp cases run ``kiln train`` as a user would (torchrun, gloo) and compare each step's
loss with one megatron-engine process on the same global batch, in fp32, with gradient
clipping active: parity at DP=2 and at TP=2 × DP=2, per-rank state halving at DP=2, a DP=2
checkpoint resumed at DP=1, and checkpoints crossing between the engines.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.kiln_run import PARITY_SETTINGS, kiln, read_metrics, train
from tests.kiln_run import assert_same_losses as same_losses

STEPS = 6
COMMON = (f"train.max_steps={STEPS}", *PARITY_SETTINGS, "optim.grad_clip=0.3")
FSDP = ("parallel.engine=fsdp",)
REL_TOL = 1e-4


# -- what fsdp cannot do is a config error naming what to use instead ----------------------
@pytest.mark.parametrize("overrides,message", [
    (("parallel.pp=2",), "use parallel.engine=megatron for pp > 1"),
    (("parallel.tp=2", "parallel.sequence_parallel=true"), "set parallel.sequence_parallel=false"),
    (("train.precision=fp16",), "needs parallel.engine=deepspeed"),
    (("parallel.offload_optimizer=cpu",), "set parallel.offload_params=cpu instead"),
    (("parallel.offload_params=nvme", "parallel.nvme_path=/nvme"), "offloads to cpu only"),
    (("optim.distributed_optimizer=true",), "set optim.distributed_optimizer=false"),
])
def test_bad_fsdp_settings_are_config_errors(overrides, message):
    from kiln.config import config_from_dict
    from kiln.errors import KilnConfigError

    with pytest.raises(KilnConfigError) as err:
        config_from_dict({}, [*FSDP, *overrides])
    assert message in str(err.value)


def test_dry_run_describes_the_fsdp_engine():
    out = kiln("train", "configs/tiny.yaml", "--dry-run", "--world-size", "2", *FSDP,
               "parallel.reshard_after_forward=false", "parallel.offload_params=cpu").stdout
    assert "engine fsdp (FSDP2, no reshard after forward, cpu offload)" in out


# -- below the CLI: the Trainer's hooks and an update a callback skips -----------------------
def _train_skipping_step_2(rank: int, engine: str) -> dict:
    """4 steps on synthetic tokens; a callback on every rank skips the update of step 2."""
    from kiln.config import config_from_dict
    from kiln.parallel.backend import destroy_parallel, init_parallel
    from kiln.train import build_run_engine
    from kiln.trainer.callbacks import Callback
    from kiln.trainer.loop import Trainer

    config = config_from_dict({}, [f"parallel.engine={engine}", "model.vocab_size=256", "train.precision=fp32",
                                   "train.device=cpu", "train.max_steps=4", "train.log_every=1",
                                   "train.micro_batch_size=2", "train.global_batch_size=8", "optim.warmup_steps=2",
                                   "logging.wandb=disabled"])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    generator = torch.Generator().manual_seed(100 + ctx.coords["dp"])
    batches = iter([{"tokens": torch.randint(0, 256, (2, config.model.seq_len + 1), generator=generator)}
                    for _ in range(16)])
    record: dict = {"hooks": [], "steps": []}

    class SkipSecondUpdate(Callback):
        def on_train_start(self, trainer):
            record["hooks"].append("train_start")

        def on_step_start(self, trainer):
            record["hooks"].append("step_start")

        def skip_update(self, trainer, result):
            record["hooks"].append("skip_update")
            record.setdefault("global_losses", []).append(trainer.global_loss(result))
            return trainer.state.step == 1  # the update of step 2

        def on_step_end(self, trainer, result):
            record["hooks"].append("step_end")
            weights = sum(float(p.detach().to_local().double().sum() if hasattr(p, "to_local") else p.double().sum())
                          for part in trainer.engine.model_parts for p in part.parameters())
            record["steps"].append({"skipped": result.skipped, "lr": trainer.engine.lr, "weights": weights})

        def on_log(self, trainer, metrics):
            record["hooks"].append("log")

        def close(self):
            record["hooks"].append("close")

    engine_ = build_run_engine(config, ctx, 256)
    trainer = Trainer(train=config.train, data=config.data, seq_len=config.model.seq_len, ctx=ctx, engine=engine_,
                      batches=batches, callbacks=[SkipSecondUpdate()])
    trainer.train()
    trainer.close()
    record["skipped_steps"] = trainer.state.skipped_steps
    destroy_parallel()
    return record


@pytest.mark.parametrize("engine", ["megatron", "fsdp"])
def test_a_callback_skips_an_update_on_every_rank(engine):
    records = run_distributed(_train_skipping_step_2, 2, engine)
    per_step = ["step_start", "skip_update", "step_end", "log"]
    for record in records:
        assert record["hooks"] == ["train_start", *per_step * 4, "close"]
        steps = record["steps"]
        assert [s["skipped"] for s in steps] == [False, True, False, False] and record["skipped_steps"] == 1
        assert steps[1]["weights"] == steps[0]["weights"]  # the skipped update moved nothing
        assert steps[2]["weights"] != steps[1]["weights"]
        # The schedule did not advance either: step 3 gets the LR step 2 would have had.
        assert steps[1]["lr"] == steps[0]["lr"] == pytest.approx(1.5e-4) and steps[2]["lr"] == pytest.approx(3e-4)
    # The loss the callback decided on is the same on every rank (averaged over DP replicas).
    assert records[0]["global_losses"] == records[1]["global_losses"]


# -- fsdp through the CLI ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """Runs by name, each trained once per module: (run dir, metrics)."""
    plans = {
        "megatron": (1, (*COMMON, "checkpoint.every=3")),
        "fsdp-dp2": (2, (*COMMON, *FSDP, "checkpoint.every=3")),
        "fsdp-tp2-dp2": (4, (*COMMON, *FSDP, "parallel.tp=2")),
    }
    done: dict[str, tuple[Path, list[dict]]] = {}

    def get(name: str) -> tuple[Path, list[dict]]:
        if name not in done:
            nproc, overrides = plans[name]
            run_dir = tmp_path_factory.mktemp(name) / "run"
            done[name] = run_dir, train(run_dir, nproc, *overrides, cache_dir=cache_dir)
        return done[name]

    return get


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory, cache_dir):
    """fsdp runs resumed from step 3 of another run, on ``nproc`` processes: their run dirs."""
    done: dict[tuple[str, int], Path] = {}

    def get(saved_by: str, nproc: int) -> Path:
        if (saved_by, nproc) not in done:
            run_dir = tmp_path_factory.mktemp(f"{saved_by}-resumed-on-{nproc}") / "run"
            step3 = runs(saved_by)[0] / "checkpoints" / "step_000003"
            kiln("train", "configs/tiny.yaml", "--nproc-per-node", str(nproc), f"train.run_dir={run_dir}",
                 "--resume-from", str(step3), *COMMON, *FSDP, cache_dir=cache_dir)
            done[saved_by, nproc] = run_dir
        return done[saved_by, nproc]

    return get


def assert_same_losses(reference: list[dict], candidate: list[dict], first_step: int = 1) -> None:
    same_losses(reference, candidate, STEPS, first_step, rel_tol=REL_TOL)


@pytest.mark.slow
# fsdp-dp2 is trained for the checkpoint tests anyway; the 4-process TP=2 × DP=2 run is extended.
@pytest.mark.parametrize("name", ["fsdp-dp2", pytest.param("fsdp-tp2-dp2", marks=pytest.mark.extended)])
def test_fsdp_matches_megatron_single_process(name, runs):
    assert_same_losses(runs("megatron")[1], runs(name)[1])


@pytest.mark.slow
def test_fsdp_shards_parameters_and_optimizer_over_data_parallel_ranks(runs, resumed):
    def ranks(run_dir: Path) -> list[dict]:
        return json.loads((run_dir / "state_bytes.json").read_text())["ranks"]

    (one,), two = ranks(resumed("fsdp-dp2", 1)), ranks(runs("fsdp-dp2")[0])  # fsdp on 1 process, and on 2
    assert len(two) == 2
    for rank in two:
        for what in ("parameters", "optimizer"):
            ratio = rank[what] / one[what]
            assert 0.45 < ratio < 0.55, f"fsdp rank {rank['rank']}: {what} bytes x{ratio:.3f} at DP=2"


@pytest.mark.slow
@pytest.mark.parametrize("saved_by,nproc", [("fsdp-dp2", 1), ("megatron", 2)],
                         ids=["fsdp-dp2-resumes-at-dp1", "megatron-checkpoint-into-fsdp-dp2"])
def test_checkpoint_resumes_under_fsdp_on_the_uninterrupted_loss(saved_by, nproc, runs, resumed):
    assert_same_losses(runs("megatron")[1], read_metrics(resumed(saved_by, nproc)), first_step=4)


@pytest.mark.slow
def test_fsdp_checkpoint_into_megatron_is_refused_before_launch(runs, tmp_path, cache_dir):
    step3 = runs("fsdp-dp2")[0] / "checkpoints" / "step_000003"
    result = kiln("train", "configs/tiny.yaml", "--nproc-per-node", "2", f"train.run_dir={tmp_path / 'run'}",
                  "--resume-from", str(step3), *COMMON, cache_dir=cache_dir, check=False)
    assert result.returncode == 2
    assert "saved by the fsdp engine" in result.stderr and "the megatron engine cannot read it" in result.stderr
    assert "parallel.engine=fsdp" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


class _CountingBatches:
    """Synthetic token batches with a position, like the real loader's state."""

    def __init__(self, seed: int, seq_len: int) -> None:
        self.seed, self.seq_len, self.position = seed, seq_len, 0

    def __next__(self) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.position)
        self.position += 1
        return {"tokens": torch.randint(0, 256, (2, self.seq_len + 1), generator=generator)}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _train_rolling_back_at_step_3(rank: int, engine: str, run_dir: Path) -> dict:
    """6 steps, checkpoints every 2; after step 3 a callback asks for a rollback (to step 2)."""
    from kiln.checkpoint.manager import CheckpointManager
    from kiln.config import config_from_dict
    from kiln.parallel.backend import destroy_parallel, init_parallel
    from kiln.train import build_run_engine
    from kiln.trainer.callbacks import Callback
    from kiln.trainer.loop import Trainer

    config = config_from_dict({}, [f"parallel.engine={engine}", "model.vocab_size=256", "train.precision=fp32",
                                   "train.device=cpu", "train.max_steps=6", "train.log_every=1",
                                   "train.micro_batch_size=2", "train.global_batch_size=4", "optim.warmup_steps=2",
                                   "logging.wandb=disabled", "checkpoint.every=2", f"train.run_dir={run_dir}"])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    checkpointer = CheckpointManager(config.checkpoint, ctx, run_dir, config.model, config.to_dict())
    checkpointer.prepare()
    record: dict = {"losses": [], "saved": []}

    class RollBackOnce(Callback):
        def on_step_end(self, trainer, result):
            record["losses"].append((trainer.state.step, trainer.global_loss(result)))
            if trainer.state.step == 3 and len(record["losses"]) == 3:
                trainer.request_rollback()

        def on_checkpoint_saved(self, trainer, step):
            record["saved"].append(step)

    trainer = Trainer(train=config.train, data=config.data, seq_len=config.model.seq_len, ctx=ctx,
                      engine=build_run_engine(config, ctx, 256), batches=_CountingBatches(ctx.coords["dp"], 128),
                      callbacks=[RollBackOnce()], checkpoint_every=config.checkpoint.every, checkpointer=checkpointer)
    trainer.train()
    record["final_step"] = trainer.state.step
    checkpointer.close()
    destroy_parallel()
    return record


def test_a_callback_rolls_back_to_the_last_checkpoint(tmp_path):
    # The megatron engine: the rollback is the trainer's; every engine's load is tested through the CLI.
    records = run_distributed(_train_rolling_back_at_step_3, 2, "megatron", tmp_path / "run")
    for record in records:
        steps = [step for step, _ in record["losses"]]
        assert steps == [1, 2, 3, 3, 4, 5, 6] and record["final_step"] == 6
        losses = dict(record["losses"][:3])
        # Weights, optimizer, LR schedule and data position all came back: step 3 again is step 3 bitwise.
        assert record["losses"][3] == (3, losses[3])
        assert record["saved"] == [2, 4, 6]
    assert records[0]["losses"] == records[1]["losses"]
