"""train.precision=fp8 decided on a CPU machine: what no machine can run is a config error, what this
machine cannot run stops before launch, and the settings megatron-core gets. Never a silent bf16 run."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from kiln.config import Fp8Config, config_from_dict
from kiln.errors import KilnConfigError, KilnEnvironmentError
from kiln.kernels import fp8, spec
from tests.kiln_run import TINY, kiln

FP8 = ["train.precision=fp8"]


# -- config errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["fp8.recipe=rowwise"], "fp8.recipe=rowwise is not a te recipe; fp8.backend=te offers delayed, tensorwise, mxfp8"),
    (["fp8.backend=torchao", "fp8.recipe=delayed"], "fp8.recipe=delayed is not a torchao recipe"),
    (["fp8.backend=torchao", "fp8.recipe=mxfp8"], "fp8.backend=torchao offers tensorwise, rowwise"),
    ([*FP8, "parallel.engine=fsdp"], "fp8.backend=te needs parallel.engine=megatron"),
    ([*FP8, "parallel.engine=deepspeed"], "or fp8.backend=torchao (stateless, any engine)"),
    ([*FP8, "fp8.backend=torchao", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true"],
     "set parallel.tp_comm_overlap=false, or use fp8.backend=te"),
    ([*FP8, "fp8.recipe=delayed", "train.recompute=selective", "train.recompute_modules=[core_attn,layernorm]"],
     "recomputes layernorm, which megatron-core does not support with fp8.recipe=delayed"),
    ([*FP8, "model.ffn_hidden_size=200", "parallel.tp=2"],
     "the MLP's width per rank, ffn_hidden_size(200) / parallel.tp(2) = 100"),
    ([*FP8, "model.seq_len=100", "train.micro_batch_size=1"],
     "tokens per micro-batch, model.seq_len(100) × train.micro_batch_size(1) / parallel.cp(1) = 100"),
])
def test_fp8_settings_no_machine_runs_are_config_errors(overrides, message):
    with pytest.raises(KilnConfigError) as error:
        config_from_dict({}, overrides)
    assert message in str(error.value)


def test_torchao_fp8_runs_with_every_engine_and_te_with_megatron():
    for engine in ("megatron", "fsdp", "deepspeed"):
        config_from_dict({}, [*FP8, "fp8.backend=torchao", f"parallel.engine={engine}"])
    config = config_from_dict({}, [*FP8, "fp8.recipe=delayed"])
    assert config.train.param_precision == "bf16" and config.fp8.recipe == "delayed"


def test_an_fp8_section_without_fp8_precision_checks_nothing_more():
    config_from_dict({}, ["fp8.backend=torchao", "parallel.engine=fsdp", "model.ffn_hidden_size=200"])


# -- the machine ------------------------------------------------------------------------------------
@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be on a GPU of a given name and compute capability."""
    def set_gpu(name: str, capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return set_gpu


@pytest.fixture
def with_te(monkeypatch):
    monkeypatch.setattr(spec, "transformer_engine_missing", lambda: None)


def test_no_gpu():
    with pytest.raises(KilnEnvironmentError) as error:
        fp8.check_fp8_environment(Fp8Config(), "cpu")
    assert str(error.value) == ("train.precision=fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability "
                                "8.9+: Ada, Hopper, Blackwell); this run is on CPU; use train.precision=bf16")


@pytest.mark.parametrize("backend,recipe", [("te", "tensorwise"), ("torchao", "rowwise")])
def test_a_gpu_before_ada_is_named(gpu, with_te, backend, recipe):
    gpu("NVIDIA A100-SXM4-80GB", (8, 0))
    with pytest.raises(KilnEnvironmentError) as error:
        fp8.check_fp8_environment(Fp8Config(backend=backend, recipe=recipe), "cuda")
    assert "this GPU is NVIDIA A100-SXM4-80GB (compute capability 8.0); use train.precision=bf16" in str(error.value)


def test_mxfp8_needs_blackwell(gpu, with_te):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(KilnEnvironmentError) as error:
        fp8.check_fp8_environment(Fp8Config(recipe="mxfp8"), "cuda")
    assert str(error.value) == ("fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability 10.0+) for its "
                                "block-scaled FP8 GEMMs; this GPU is NVIDIA H100 80GB HBM3 (compute capability 9.0); "
                                "use fp8.recipe=tensorwise or delayed")


def test_transformer_engine_absent(gpu, monkeypatch):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    spec.transformer_engine_missing.cache_clear()
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # its import raises ImportError
    try:
        with pytest.raises(KilnEnvironmentError) as error:
            fp8.check_fp8_environment(Fp8Config(), "cuda")
    finally:
        spec.transformer_engine_missing.cache_clear()
    message = str(error.value)
    assert message.startswith("fp8.backend=te needs Transformer Engine: transformer_engine does not import")
    assert "pip install 'kiln[gpu]'" in message and "or use fp8.backend=torchao" in message


def test_transformer_engine_too_old_for_the_recipe(gpu, with_te, monkeypatch):
    import megatron.core.utils as mcore_utils

    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(mcore_utils, "is_te_min_version", lambda version, check_equality=True: version < "2.2")
    monkeypatch.setattr(mcore_utils, "get_te_version", lambda: "2.1.0")
    with pytest.raises(KilnEnvironmentError) as error:
        fp8.check_fp8_environment(Fp8Config(recipe="tensorwise"), "cuda")
    assert "fp8.recipe=tensorwise needs Transformer Engine 2.2.0 or newer" in str(error.value)
    fp8.check_fp8_environment(Fp8Config(recipe="delayed"), "cuda")  # delayed runs on it


def test_torchao_absent(gpu, monkeypatch):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(KilnEnvironmentError) as error:
        fp8.check_fp8_environment(Fp8Config(backend="torchao"), "cuda")
    message = str(error.value)
    assert message.startswith("fp8.backend=torchao needs torchao's float8 training: torchao.float8 does not import")
    assert "pip install 'kiln[fp8]'" in message and "or use fp8.backend=te" in message


def test_torchao_without_recipe_names_is_too_old(gpu, monkeypatch):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    old = types.ModuleType("torchao.float8")
    old.Float8LinearConfig, old.convert_to_float8_training = type("Float8LinearConfig", (), {}), None
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", old)
    with pytest.raises(KilnEnvironmentError, match="needs torchao 0.10 or newer"):
        fp8.check_fp8_environment(Fp8Config(backend="torchao"), "cuda")


def test_the_cli_refuses_fp8_on_cpu_before_starting_workers():
    result = kiln("train", TINY, "--nproc-per-node", "2", *FP8, check=False)
    assert result.returncode == 2
    assert "train.precision=fp8 needs an NVIDIA GPU with FP8 tensor cores" in result.stderr
    assert "use train.precision=bf16" in result.stderr
    assert "torch.distributed" not in result.stderr and "run directory" not in result.stdout  # nothing started


# -- what megatron-core gets ------------------------------------------------------------------------
def _transformer_config(overrides: list[str], device: str):
    from kiln.model.builder import transformer_config

    config = config_from_dict({}, overrides)
    ctx = types.SimpleNamespace(layout=config.layout(1), device=torch.device(device))
    active = config.fp8 if config.train.precision == "fp8" else None
    return transformer_config(config.model, config.parallel, config.train, ctx, active)


@pytest.mark.parametrize("recipe,settings", [
    ("delayed", dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max")),
    ("tensorwise", dict(fp8="hybrid", fp8_recipe="tensorwise")),
    ("mxfp8", dict(fp8="e4m3", fp8_recipe="mxfp8")),
])
def test_te_fp8_settings(recipe, settings):
    section = Fp8Config(recipe=recipe, amax_history_len=16)
    assert fp8.te_transformer_settings(section, transformer_engine=True) == settings
    assert fp8.te_transformer_settings(None, transformer_engine=True) == {}


def test_torchao_fp8_runs_on_the_local_spec_without_te_settings(with_te):
    tconfig = _transformer_config([*FP8, "fp8.backend=torchao"], "cuda")
    assert tconfig.fp8 is None and tconfig.bf16 and tconfig.params_dtype == torch.bfloat16
    # TE's fused weight-gradient GEMM would write main_grad past torchao's GEMM: off on the local spec.
    assert not tconfig.gradient_accumulation_fusion and not tconfig.apply_rope_fusion
    assert not spec.uses_transformer_engine("cuda", Fp8Config(backend="torchao"))
    assert spec.uses_transformer_engine("cuda", Fp8Config(backend="te"))


def test_te_fp8_without_te_never_builds_a_bf16_model():
    with pytest.raises(KilnEnvironmentError, match="fp8.backend=te needs"):
        _transformer_config(FP8, "cpu")


def test_te_delayed_scaling_state_may_be_unpickled_during_a_load_only(monkeypatch):
    monkeypatch.delenv(fp8.TE_PICKLE_OPT_IN, raising=False)
    with fp8.trusted_te_extra_state():
        assert os.environ[fp8.TE_PICKLE_OPT_IN] == "1"
    assert fp8.TE_PICKLE_OPT_IN not in os.environ
    monkeypatch.setenv(fp8.TE_PICKLE_OPT_IN, "0")
    with fp8.trusted_te_extra_state():
        pass
    assert os.environ[fp8.TE_PICKLE_OPT_IN] == "0"
