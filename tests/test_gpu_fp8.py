"""train.precision=fp8 on an FP8-capable GPU, through `kiln train` as a user runs it: each backend trains
the tiny model close to bf16, and a resume continues on the uninterrupted losses with the FP8 state
restored (Transformer Engine's delayed scaling: the amax histories and scales the checkpoint holds).

Skipped without CUDA (the ``gpu`` marker), on GPUs before compute capability 8.9, and per backend
where its library is absent (TE builds from source; torchao: ``pip install 'kiln[fp8]'``).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

from tests.kiln_run import REPO, kiln, read_metrics, train

pytestmark = pytest.mark.gpu

STEPS = 50
GPU = ("train.device=cuda", "train.log_every=1", "logging.wandb=disabled", "checkpoint.every=0")
BACKENDS = [("te", "tensorwise"), ("te", "delayed"), ("torchao", "tensorwise"), ("torchao", "rowwise")]


def _require(backend: str) -> None:
    from kiln.kernels import fp8, spec

    if torch.cuda.get_device_capability() < fp8.FP8_CAPABILITY:
        pytest.skip(f"{torch.cuda.get_device_name()} has no FP8 tensor cores")
    missing = spec.transformer_engine_missing() if backend == "te" else fp8.torchao_missing()
    if missing:
        pytest.skip(missing)


def _fp8(backend: str, recipe: str) -> tuple[str, ...]:
    return ("train.precision=fp8", f"fp8.backend={backend}", f"fp8.recipe={recipe}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory, cache) -> list[float]:
    run_dir = tmp_path_factory.mktemp("bf16")
    return [m["loss"] for m in train(run_dir, 1, *GPU, "train.precision=bf16", f"train.max_steps={STEPS}",
                                     cache_dir=cache)]


@pytest.mark.parametrize("backend,recipe", BACKENDS)
def test_fp8_trains_close_to_bf16(backend, recipe, bf16_losses, tmp_path, cache):
    _require(backend)
    run_dir = tmp_path / "run"
    result = kiln("train", "configs/tiny.yaml", f"train.run_dir={run_dir}", *GPU, *_fp8(backend, recipe),
                  f"train.max_steps={STEPS}", cache_dir=cache)
    assert f"fp8 ({backend} {recipe} GEMMs, bf16 parameters)" in result.stdout  # the FP8 path ran, not bf16
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(bf16_losses[0], rel=0.01)  # the same model and batch
    assert losses[-1] < losses[0]
    tail, bf16_tail = sum(losses[-10:]) / 10, sum(bf16_losses[-10:]) / 10
    assert tail == pytest.approx(bf16_tail, rel=0.05), f"last 10 steps: fp8 {tail:.4f} vs bf16 {bf16_tail:.4f}"


# A resume whose Transformer Engine modules report the delayed-scaling state they were given.
_RECORD_RESTORED_TE_STATE = """
import json, sys
from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
from kiln.cli import main

restored, set_extra_state = [], TransformerEngineBaseModule.set_extra_state

def recording(self, state):
    set_extra_state(self, state)
    if "scaling_fwd" in self.fp8_meta:
        restored.append([getattr(self.fp8_meta[k], t).cpu().flatten().tolist()
                         for k in ("scaling_fwd", "scaling_bwd") for t in ("scale", "amax_history")])

TransformerEngineBaseModule.set_extra_state = recording
code = main(["train", "configs/tiny.yaml", *sys.argv[2:]])
open(sys.argv[1], "w").write(json.dumps(restored))
sys.exit(code)
"""


def _saved_te_states(step_dir) -> list:
    """The delayed-scaling state of every TE module in a checkpoint (as _RECORD_RESTORED_TE_STATE lists it)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = step_dir.parent / "all.pt"
    dcp_to_torch_save(str(step_dir), str(path))
    states = []
    for name, value in torch.load(path, weights_only=False).items():
        if "_extra_state" not in name:
            continue
        if isinstance(value, io.BytesIO):
            value = torch.load(value, weights_only=False)
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        state = pickle.loads(value.cpu().numpy().tobytes())
        if "scale_fwd" in state:
            states.append([state[f"{t}_{d}"].flatten().tolist() for d in ("fwd", "bwd")
                           for t in ("scale", "amax_history")])
    return states


@pytest.mark.parametrize("backend,recipe", [("te", "delayed"), ("torchao", "tensorwise")])
def test_resume_keeps_the_fp8_state_and_the_losses(backend, recipe, tmp_path, cache):
    _require(backend)
    steps = ("train.max_steps=8",)
    reference = tmp_path / "reference"
    want = [m["loss"] for m in train(reference, 1, *GPU, *_fp8(backend, recipe), *steps, "checkpoint.every=4",
                                     cache_dir=cache)]
    saved = reference / "checkpoints" / "step_000004"
    run_dir, restored_path = tmp_path / "resumed", tmp_path / "restored.json"
    args = [f"train.run_dir={run_dir}", *GPU, *_fp8(backend, recipe), *steps, f"checkpoint.resume_from={saved}"]
    if backend == "te":
        out = subprocess.run([sys.executable, "-c", _RECORD_RESTORED_TE_STATE, str(restored_path), *args],
                             cwd=REPO, env={**os.environ, "KILN_CACHE_DIR": str(cache)},
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        restored, in_checkpoint = json.loads(restored_path.read_text()), _saved_te_states(saved)
        assert in_checkpoint, "the checkpoint holds no delayed-scaling state"
        assert any(value != 0 for state in in_checkpoint for value in state[1]), "no amax was ever recorded"
        assert sorted(restored) == sorted(in_checkpoint)  # every module got back exactly what was saved
    else:
        kiln("train", "configs/tiny.yaml", *args, cache_dir=cache)  # torchao's dynamic scaling has no state
    got = {m["step"]: m["loss"] for m in read_metrics(run_dir)}
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert loss == pytest.approx(want[step - 1], rel=2e-3), f"step {step}: {loss} vs {want[step - 1]}"
