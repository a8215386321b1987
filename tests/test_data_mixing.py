"""Dataset mixtures (data.streams) and the validation split (data.val)."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest

from kiln.config import load_config
from kiln.data.loader import build_train_loader
from kiln.data.pack import write_samples_to_mds
from kiln.errors import KilnConfigError, KilnDataError
from tests.kiln_run import TINY, train

SAMPLE_LEN = 9


def make_stream(path, n: int, first_token: int, sample_len: int = SAMPLE_LEN) -> str:
    """n samples whose first token names the stream."""
    samples = (np.concatenate([[first_token], np.arange(1, sample_len)]).astype(np.uint16) for _ in range(n))
    write_samples_to_mds(samples, str(path), sample_len=sample_len, vocab_size=4096, size_limit=400,
                         meta={"eos_id": 0})
    return str(path)


@pytest.fixture
def single_process(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # streaming's locks stay out of /tmp


def _share_of_first_stream(streams, n_samples=10_000, micro_batch_size=20) -> float:
    loader = build_train_loader(streams, micro_batch_size=micro_batch_size, seed=5, dp_rank=0, dp_size=1)
    firsts = np.concatenate([next(loader)["tokens"][:, 0].numpy() for _ in range(n_samples // micro_batch_size)])
    return float((firsts == 1).mean())


@pytest.mark.parametrize("weights, expected", [
    ({"proportion": (0.8, 0.2)}, 0.8),
    ({"proportion": (0.3, 0.7)}, 0.3),
    ({"repeat": (1.0, 3.0)}, 500 / (500 + 3 * 200)),  # the small stream upsampled 3×
])
def test_mixture_lands_within_2_percent_over_10k_samples(single_process, tmp_path, weights, expected):
    a, b = make_stream(tmp_path / "a", 500, first_token=1), make_stream(tmp_path / "b", 200, first_token=2)
    (kind, (wa, wb)), = weights.items()
    share = _share_of_first_stream([{"path": a, kind: wa}, {"path": b, kind: wb}])
    assert share == pytest.approx(expected, abs=0.02)


def test_streams_must_agree_on_sample_length(single_process, tmp_path):
    a = make_stream(tmp_path / "a", 50, first_token=1)
    b = make_stream(tmp_path / "b", 50, first_token=2, sample_len=17)
    with pytest.raises(KilnDataError, match="disagree on seq_len"):
        build_train_loader([{"path": a, "proportion": 0.5}, {"path": b, "proportion": 0.5}], micro_batch_size=2,
                           seed=0, dp_rank=0, dp_size=1)


@pytest.mark.parametrize("overrides, message", [
    (["data.path=x", "data.streams=[{path: a}]"], "both set"),
    (["data.streams=[{path: a, proportion: 0.5}, {path: b}]"], "give every stream a proportion"),
    (["data.streams=[{path: a, proportion: 0.5, repeat: 2}]"], "both proportion and repeat"),
    (["data.streams=[{proportion: 0.5}]"], "needs a path"),
    (["data.streams=[{path: a, weight: 1}]"], "unknown setting 'data.streams[0].weight'"),
    (["data.streams=a"], "expected a list"),
    (["data.val.batches=0"], "data.val.batches must be >= 1"),
])
def test_bad_mixture_or_validation_settings(overrides, message):
    with pytest.raises(KilnConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(TINY, overrides)


@pytest.mark.slow
def test_validation_loss_is_logged_during_training(tmp_path):
    from kiln.data.bundled import ensure_bundled_dataset

    # The bundled corpus packed at seq 128 stands in for held-out data here.
    val = ensure_bundled_dataset(128, cache_dir=str(tmp_path / "cache"))
    metrics = train(tmp_path / "run", 2, "train.max_steps=4", "train.log_every=4", "logging.wandb=disabled",
                    "checkpoint.every=0", f"data.val.path={val}", "data.val.every=2", "data.val.batches=2",
                    cache_dir=tmp_path / "cache")
    evaluated = {m["step"]: m for m in metrics if "val_loss" in m}
    assert sorted(evaluated) == [2, 4]  # every 2 steps, logged even off the log_every cadence
    for m in evaluated.values():
        assert math.isfinite(m["val_loss"]) and m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    assert evaluated[4]["val_loss"] < evaluated[2]["val_loss"]  # the model learns
