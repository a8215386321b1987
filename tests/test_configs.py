"""The shipped configs: they load, every documented model × GPU layout validates, dry runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kiln.config import RunConfig, load_config
from kiln.errors import KilnConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ["llama3-125m", "llama3-1b", "llama3-8b", "llama3-70b", "mixtral-small"]
GPU_COUNTS = [8, 64, 512]


def _layout_table() -> list[tuple[str, int, list[str], str, str]]:
    """Rows of the model × GPU table in configs/README.md: (config, gpus, overrides, layout, batch)."""
    rows = []
    for line in (CONFIGS / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].isdigit():
            overrides = [] if cells[2] == "—" else cells[2].strip("`").split()
            rows.append((cells[0].strip("`"), int(cells[1]), overrides, cells[3], cells[4]))
    return rows


TABLE = _layout_table()


def test_every_shipped_config_loads() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.stem for f in files} >= {"tiny", *PRESETS}
    for path in files:
        config = load_config(path)
        assert config.name == path.stem
        text = path.read_text()
        assert text.startswith("#"), f"{path.name} needs a top-of-file comment"


def test_tiny_is_the_cpu_default() -> None:
    config = load_config(CONFIGS / "tiny.yaml")
    m, t = config.model, config.train
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.query_groups, m.seq_len) == (2, 64, 4, 2, 128)
    assert m.vocab_size is None and config.data.path is None and config.data.tokenizer is None
    assert (t.precision, t.device, t.micro_batch_size, t.global_batch_size, t.max_steps) == ("fp32", "auto", 4, 16, 300)
    assert (config.optim.lr, config.optim.min_lr, config.optim.warmup_steps) == (3e-3, 3e-4, 20)
    assert config.logging.wandb == "offline"
    for world in (1, 2):
        config.layout(world)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_llama_style(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.yaml")
    m = config.model
    assert m.rope_theta == 500000.0 and m.norm_eps == 1e-5 and m.vocab_size is not None
    assert config.train.precision == "bf16" and config.train.device == "cuda"
    assert config.data.tokenizer.startswith("/path/to/") and config.data.path.startswith("/path/to/")


def test_table_covers_every_model_and_gpu_count() -> None:
    assert sorted((cfg, gpus) for cfg, gpus, *_ in TABLE) == sorted(
        (f"{name}.yaml", gpus) for name in PRESETS for gpus in GPU_COUNTS
    )


@pytest.mark.parametrize("config_file,gpus,overrides,layout_text,batch_text", TABLE, ids=lambda v: str(v))
def test_table_row_validates(config_file: str, gpus: int, overrides: list[str], layout_text: str, batch_text: str) -> None:
    config = load_config(CONFIGS / config_file, overrides)
    layout = config.layout(gpus)
    vpp = f" (virtual {layout.virtual_pp})" if layout.virtual_pp else ""
    experts = ""
    if config.model.moe.enabled:
        experts = f", ep {layout.ep}" + (f" (expert_tp {layout.expert_tp})" if layout.expert_tp != layout.tp else "")
    assert layout_text == f"tp {layout.tp}, pp {layout.pp}{vpp}, dp {layout.dp}{experts}"
    assert batch_text == f"{config.train.micro_batch_size} × {layout.num_microbatches(config.train)}"
    # tokens per step stay ~1-4M whatever the GPU count
    assert 1_000_000 <= config.train.global_batch_size * config.model.seq_len <= 4_200_000
    report = config.dry_run_report(gpus)  # the presets set vocab_size: no tokenizer is read
    assert f"on {gpus} ranks" in report


def test_dry_run_8b_on_64() -> None:
    report = load_config(CONFIGS / "llama3-8b.yaml").dry_run_report(64)
    assert "8.03B (8,030,261,248)" in report
    assert "world 64 = dp 32 × pp 1 × cp 1 × tp 2" in report
    assert "tp groups (32 × 2 ranks): [0,1]  [2,3]" in report
    assert "dp groups (2 × 32 ranks): [0..62 step 2]  [1..63 step 2]" in report
    assert "stage 0: layers 0-31 + embedding + final norm + output" in report
    assert "per rank 4.02B" in report
    assert "micro-batch 1 × dp 32 × 16 grad-accumulation micro-batches" in report
    assert "tokens per step 4,194,304" in report


def test_dry_run_70b_lists_interleaved_chunks() -> None:
    report = load_config(CONFIGS / "llama3-70b.yaml").dry_run_report(512)
    assert "70.55B (70,553,706,496)" in report
    assert "stage 0: layers 0-3, 16-19, 32-35, 48-51, 64-67 + embedding" in report
    assert "stage 3: layers 12-15, 28-31, 44-47, 60-63, 76-79 + final norm + output" in report


def test_dry_run_tiny_with_explicit_vocab() -> None:
    config = load_config(CONFIGS / "tiny.yaml")
    report = config.dry_run_report(2, vocab_size=4096)
    assert "vocab 4,096" in report and "647.49K (647,488)" in report
    assert "micro-batch 4 × dp 2 × 2 grad-accumulation" in report


def test_dry_run_unreadable_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "tiny.yaml", [f"data.tokenizer={tmp_path / 'missing.json'}"])
    with pytest.raises(KilnConfigError, match="data.tokenizer"):
        config.dry_run_report(1)


def test_heads_not_divisible_by_tp() -> None:
    config = load_config(CONFIGS / "llama3-8b.yaml", ["parallel.tp=3"])
    with pytest.raises(KilnConfigError, match=re.escape("32 / 3")):
        config.dry_run_report(48)


def test_model_parallel_not_dividing_world() -> None:
    config = load_config(CONFIGS / "llama3-8b.yaml", ["parallel.tp=3"])
    with pytest.raises(KilnConfigError, match="does not divide world size 64"):
        config.dry_run_report(64)
    with pytest.raises(KilnConfigError, match=re.escape("tp(8) × pp(4) × cp(1) = 32 does not divide world size 48")):
        load_config(CONFIGS / "llama3-70b.yaml").dry_run_report(48)


def test_dry_run_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run must not create process groups")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.distributed, "new_group", refuse)
    config: RunConfig = load_config(CONFIGS / "llama3-70b.yaml")
    config.dry_run_report(64)
    assert not torch.distributed.is_initialized()


# The model and batch shrunk to a toy; every parallel, optimizer and precision setting is the preset's.
TOY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
       "model.ffn_hidden_size=128", "model.vocab_size=null", "model.seq_len=64", "data.path=null",
       "data.tokenizer=null", "data.num_workers=0", "train.global_batch_size=4", "train.micro_batch_size=2",
       "train.max_steps=4", "train.log_every=1", "train.device=cpu", "logging.wandb=disabled",
       "checkpoint.every=0"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", [pytest.param("llama3-8b", marks=pytest.mark.extended), "llama3-70b"])
def test_preset_parallel_settings_train_on_cpu(preset, tmp_path) -> None:
    """The 8B preset's tp 2 + sequence parallel + distributed optimizer, and the 70B preset's
    interleaved pipeline with selective recompute, on a toy model (the local layer spec)."""
    from tests.kiln_run import train

    layout = ["parallel.pp=1", "parallel.virtual_pp=null"] if preset == "llama3-8b" else \
        ["parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=2", "parallel.virtual_pp=2",
         "model.num_layers=4"]
    metrics = train(tmp_path / "run", 2, *TOY, *layout, config=f"configs/{preset}.yaml",
                    cache_dir=tmp_path / "cache")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
