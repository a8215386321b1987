"""The typed run config: YAML, dotted overrides, and errors that name the setting."""

from __future__ import annotations

import pytest

from kiln.config import config_from_dict, dump_config, load_config, parse_overrides
from kiln.errors import KilnConfigError


def test_overrides_parse_as_yaml_and_coerce():
    config = config_from_dict({}, ["optim.lr=3e-4", "parallel.tp=2", "checkpoint.async=false", "train.run_dir=/tmp/x"])
    assert config.optim.lr == pytest.approx(3e-4) and isinstance(config.optim.lr, float)
    assert config.parallel.tp == 2
    assert config.checkpoint.async_save is False
    assert config.train.run_dir == "/tmp/x"


def test_override_syntax_error():
    with pytest.raises(KilnConfigError, match="not of the form section.key=value"):
        parse_overrides(["optim.lr"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "unknown setting 'optim.lrr'; did you mean 'optim.lr'?"),
        ("modle.num_layers=2", "unknown setting 'modle'; did you mean 'model'?"),
        ("train.precision=fp4", "train.precision: 'fp4' is not one of 'fp32', 'bf16'"),
        ("model.num_layers=2.5", "model.num_layers: expected an integer, got 2.5"),
        ("train.seed=true", "train.seed: expected an integer, got True"),
        ("model.hidden_size=65", "model.hidden_size(65) is not divisible by model.num_attention_heads(4): 65 / 4 = 16.25"),
        ("optim.min_lr=1.0", "optim.min_lr(1.0) must be in [0, optim.lr(0.0003)]"),
        ("model.num_query_groups=3", "model.num_attention_heads(4) is not divisible by model.num_query_groups(3)"),
        ("kernels.compile=true parallel.cp=2", "kernels.compile with parallel.cp=2: ring attention"),
        ("kernels.attention=xformers", "kernels.attention: 'xformers' is not one of 'auto', 'flash'"),
        ("fp8.recipe=rowwise", "fp8.recipe=rowwise is not a te recipe; fp8.backend=te offers delayed, tensorwise, mxfp8"),
    ],
)
def test_bad_values_name_the_setting(override, message):
    with pytest.raises(KilnConfigError) as err:
        config_from_dict({}, override.split())
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["parallel.tp=2", "parallel.pp=2"], 6, "parallel: tp(2) × pp(2) × cp(1) = 4 does not divide world size 6"),
        (["parallel.dp=3"], 4, "× dp(3) = 3 does not equal world size 4"),
        (["model.num_layers=3", "parallel.pp=2"], 2, "model.num_layers(3) is not divisible by parallel.pp(2) = 2 pipeline chunks"),
        (["model.num_query_groups=2", "parallel.tp=4"], 4, "model.num_query_groups(2) is not divisible by parallel.tp(4)"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], 2,
         "train.global_batch_size(10) is not divisible by train.micro_batch_size(4) × dp(2) = 8"),
        (["parallel.pp=2", "parallel.virtual_pp=2", "model.num_layers=4", "train.global_batch_size=12",
          "train.micro_batch_size=4"], 2, "to be a multiple of parallel.pp(2)"),
    ],
)
def test_layout_errors_show_the_arithmetic(overrides, world, message):
    config = config_from_dict({}, overrides)
    with pytest.raises(KilnConfigError) as err:
        config.layout(world)
    assert message in str(err.value)


def test_rank_order_keeps_a_data_parallel_replica_contiguous():
    config = config_from_dict({}, ["parallel.tp=2", "parallel.pp=2", "train.global_batch_size=16"])
    layout = config.layout(8)
    assert layout.dp == 2 and layout.replica_size == 4
    assert [layout.coords(r)["dp"] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for rank in range(8):  # coords agree with megatron-core's own rank generator
        c = layout.coords(rank)
        assert [g for g in layout.groups("tp") if rank in g][0][c["tp"]] == rank
        assert [g for g in layout.groups("pp") if rank in g][0][c["pp"]] == rank


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    config = load_config("configs/tiny.yaml", ["optim.lr=1e-3"])
    dump_config(config, path)
    again = load_config(path)
    assert again.to_dict() == config.to_dict()
    assert again.name == "tiny"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(KilnConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(KilnConfigError, match="not valid YAML"):
        load_config(bad)


def test_unknown_engine_lists_the_registered_ones():
    from kiln.engine import ENGINES

    with pytest.raises(KilnConfigError) as err:
        config_from_dict({}, ["parallel.engine=zero"])
    assert "'zero' is not an engine" in str(err.value)
    assert all(name in str(err.value) for name in ENGINES) and len(ENGINES) == 3
