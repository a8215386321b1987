"""`kiln ckpt inspect` and `kiln ckpt convert` on a checkpoint made by a real (tiny) training run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kiln.checkpoint import store
from kiln.checkpoint.tools import resolve_step_dir
from kiln.cli import main
from kiln.errors import KilnCheckpointError
from tests.kiln_run import kiln, train

# configs/tiny.yaml: hidden 64, the bundled tokenizer's 4096 tokens (already a multiple of 128).
EMBEDDING = "embedding.word_embeddings.weight"
EMBEDDING_SHAPE = (4096, 64)


def kiln_here(capsys, *args: str) -> tuple[int, str, str]:
    """`kiln ARGS` in this process (the CLI's parser and error handling, without a second torch import)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One 2-step training run (1 process) that saves a checkpoint at step 2; shared by the module."""
    base = tmp_path_factory.mktemp("ckpt_tools")
    train(base / "run", 1, "train.max_steps=2", "checkpoint.every=2", "logging.wandb=disabled",
          "train.global_batch_size=4", cache_dir=base / "cache")
    return base / "run"


@pytest.fixture(scope="module")
def step_dir(run) -> Path:
    return run / "checkpoints" / store.step_dir_name(2)


@pytest.fixture(scope="module")
def reference(step_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as torch's own DCP → torch.save converter assembles it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = tmp_path_factory.mktemp("reference") / "all.pt"
    dcp_to_torch_save(str(step_dir), str(path))
    everything = torch.load(path, weights_only=False)  # it also holds the pickled RNG and _extra_state objects
    return {name: value for name, value in everything.items() if isinstance(value, torch.Tensor)}


@pytest.fixture
def report(run, capsys) -> dict:
    code, out, _ = kiln_here(capsys, "ckpt", "inspect", str(run / "checkpoints"), "--json")
    assert code == 0
    return json.loads(out)


@pytest.mark.slow
def test_inspect_prints_counters_layout_and_global_shapes(run):
    out = kiln("ckpt", "inspect", str(run / "checkpoints")).stdout  # the root: its `latest` step
    lines = out.splitlines()
    assert "step         2" in lines
    assert "consumed     1,024 tokens, 8 samples" in lines  # 2 steps × 4 samples × 128 tokens
    assert "layout       tp=1 pp=1 cp=1 dp=1 (world size 1)" in lines
    assert "engine       megatron" in lines
    assert "manifest     ok (sizes and CRC32s)" in lines
    embedding_rows = [line.split() for line in lines if line.split()[:1] == [EMBEDDING]]
    assert embedding_rows and embedding_rows[0][1:3] == ["(4096,", "64)"] and embedding_rows[0][3] == "float32"
    assert "optimizer tensors" in out and "optimizer.state.exp_avg." + EMBEDDING in out


@pytest.mark.slow
def test_inspect_json_lists_model_and_optimizer_tensors(report, step_dir):
    assert report["checkpoint"] == str(step_dir)
    assert report["step"] == 2 and report["consumed_samples"] == 8 and report["consumed_tokens"] == 1024
    assert report["verified"] == {"ok": True, "reason": "", "checksums": True}
    assert report["layout"]["world_size"] == 1 and report["versions"]["torch"] == torch.__version__
    assert report["files"] == len(store.read_manifest(step_dir)["files"]) + 1  # the manifest does not list itself
    tensors = {t["name"]: t for t in report["tensors"]}
    assert tensors[EMBEDDING] == {"name": EMBEDDING, "kind": "model", "shape": list(EMBEDDING_SHAPE),
                                  "dtype": "float32", "bytes": 4096 * 64 * 4}
    assert tensors["optimizer.state.exp_avg_sq." + EMBEDDING]["kind"] == "optimizer"
    model = [t for t in report["tensors"] if t["kind"] == "model"]
    assert report["model"]["tensors"] == len(model) > 0
    assert report["model"]["parameters"] == sum(torch.Size(t["shape"]).numel() for t in model)
    assert not any("_extra_state" in name or "rng" in name for name in tensors)
    assert any(name.startswith("kiln.rng_state") for name in report["objects"])


@pytest.mark.slow
def test_convert_to_torch_writes_the_full_model_tensors(step_dir, report, reference, tmp_path):
    out = tmp_path / "model.pt"
    result = kiln("ckpt", "convert", str(step_dir), str(out))
    assert f"wrote {out} (torch): {report['model']['tensors']} tensors" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left beside it
    converted = torch.load(out, weights_only=True)
    expected = {t["name"]: t for t in report["tensors"] if t["kind"] == "model"}
    assert converted.keys() == expected.keys()
    for name, tensor in converted.items():
        assert list(tensor.shape) == expected[name]["shape"], name
        assert str(tensor.dtype) == "torch." + expected[name]["dtype"], name
        assert torch.equal(tensor, reference[name]), name
    assert converted[EMBEDDING].std() > 0  # real weights, not an empty buffer


@pytest.mark.slow
def test_convert_refuses_to_overwrite_unless_asked(step_dir, tmp_path, capsys):
    out = tmp_path / "model.pt"
    out.write_bytes(b"keep me")
    code, _, err = kiln_here(capsys, "ckpt", "convert", str(step_dir), str(out))
    assert code == 2 and "already exists; pass --overwrite" in err
    assert out.read_bytes() == b"keep me"
    assert kiln_here(capsys, "ckpt", "convert", str(step_dir), str(out), "--overwrite")[0] == 0
    assert EMBEDDING in torch.load(out, weights_only=True)


@pytest.mark.slow
def test_convert_to_safetensors_with_optimizer_state(run, report, reference, tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors")
    out = tmp_path / "model.safetensors"  # the suffix picks the format
    code, stdout, _ = kiln_here(capsys, "ckpt", "convert", str(run), str(out), "--include-optimizer")  # a run dir
    assert code == 0 and f"wrote {out} (safetensors): {len(report['tensors'])} tensors" in stdout
    with safetensors.safe_open(str(out), framework="pt") as f:
        assert f.metadata()["kiln_step"] == "2"
        converted = {name: f.get_tensor(name) for name in f.keys()}
    assert converted.keys() == {t["name"] for t in report["tensors"]}
    assert any(name.startswith("optimizer.") for name in converted)
    for name, tensor in converted.items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.slow
def test_safetensors_missing_says_how_to_install_it(step_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` raise ImportError
    out = tmp_path / "model.bin"
    code, _, err = kiln_here(capsys, "ckpt", "convert", str(step_dir), str(out), "--format", "safetensors")
    assert code == 2 and "`pip install safetensors`" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_truncated_shard_is_reported_and_not_converted(step_dir, tmp_path):
    damaged = tmp_path / "checkpoints" / step_dir.name
    shutil.copytree(step_dir, damaged)
    shard = max(damaged.glob("__*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    inspected = kiln("ckpt", "inspect", str(damaged), check=False)
    assert inspected.returncode == 2
    assert f"manifest     NOT OK: {shard.name} has" in inspected.stdout and "(truncated?)" in inspected.stdout
    assert EMBEDDING in inspected.stdout  # the tensor table comes from .metadata, which is intact

    out = tmp_path / "out" / "model.pt"
    converted = kiln("ckpt", "convert", str(damaged), str(out), check=False)
    assert converted.returncode == 2
    assert converted.stderr.startswith(f"kiln: error: checkpoint {damaged} is damaged ({shard.name} has")
    assert "convert writes nothing from a damaged checkpoint" in converted.stderr
    assert "Traceback" not in converted.stderr
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_path_resolves_to_latest_then_newest_step(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 3):
        (root / store.step_dir_name(step)).mkdir(parents=True)
    store.write_latest(root, 1)
    assert resolve_step_dir(root) == root / "step_000001"
    assert resolve_step_dir(tmp_path / "run") == root / "step_000001"  # a run directory
    assert resolve_step_dir(root / "step_000003") == root / "step_000003"
    (root / store.LATEST).unlink()
    assert resolve_step_dir(root) == root / "step_000003"
    with pytest.raises(KilnCheckpointError, match="holds no checkpoint"):
        resolve_step_dir(tmp_path)
    with pytest.raises(KilnCheckpointError, match="does not exist"):
        resolve_step_dir(tmp_path / "nowhere")
