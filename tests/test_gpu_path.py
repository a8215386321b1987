"""The GPU path's decisions, checked on a CPU machine: which kernels, which peak, which environment."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from kiln.config import config_from_dict
from kiln.kernels import spec
from kiln.kernels.fusions import fusion_settings
from kiln.parallel.backend import worker_environment
from kiln.plan import flops
from tests.kiln_run import REPO


# -- Transformer Engine detection ----------------------------------------------------------
@pytest.fixture
def fresh_te_check():
    """Listed before monkeypatch in a test, so the cache is cleared after monkeypatch has undone its changes."""
    spec.transformer_engine_missing.cache_clear()
    yield
    spec.transformer_engine_missing.cache_clear()


def test_te_check_names_the_missing_pytorch_half(fresh_te_check, monkeypatch):
    # A TE install without its PyTorch extension: the bare package imports, megatron-core still can't use it.
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # import raises ImportError
    missing = spec.transformer_engine_missing()
    assert missing is not None and missing.startswith("transformer_engine.pytorch does not import")
    assert not spec.uses_transformer_engine("cuda")


def test_te_check_without_te_names_the_package(fresh_te_check, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    assert spec.transformer_engine_missing().startswith("transformer_engine does not import")


def test_no_te_spec_on_cpu_even_with_te(fresh_te_check, monkeypatch):
    monkeypatch.setattr(spec, "transformer_engine_missing", lambda: None)
    assert spec.uses_transformer_engine("cuda") and not spec.uses_transformer_engine("cpu")


# -- fusions ----------------------------------------------------------------------------------
def test_fusions_on_gpu_need_no_te_except_rope_and_grad_accumulation():
    without_te = fusion_settings("cuda", transformer_engine=False, main_grad=True)
    assert without_te["bias_activation_fusion"] and without_te["bias_dropout_fusion"]
    assert without_te["cross_entropy_loss_fusion"] and without_te["cross_entropy_fusion_impl"] == "native"
    assert not without_te["apply_rope_fusion"] and not without_te["gradient_accumulation_fusion"]
    with_te = fusion_settings("cuda", transformer_engine=True, main_grad=True)
    assert with_te["apply_rope_fusion"] and with_te["gradient_accumulation_fusion"]
    # fsdp/deepspeed keep gradients in param.grad: TE must not write into a main_grad that is not there.
    assert not fusion_settings("cuda", transformer_engine=True, main_grad=False)["gradient_accumulation_fusion"]
    assert not any(v for v in fusion_settings("cpu", transformer_engine=True, main_grad=True).values() if v is True)


# -- MFU peaks ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989),
    ("NVIDIA H100 PCIe", "bf16", 756),
    ("NVIDIA H100 NVL", "bf16", 835),
    ("NVIDIA H200", "bf16", 989),
    ("NVIDIA GH200 480GB", "bf16", 989),
    ("NVIDIA H800", "bf16", 989),
    ("NVIDIA A800-SXM4-80GB", "bf16", 312),
    ("NVIDIA L4", "bf16", 121),
    ("NVIDIA L40", "bf16", 181),
    ("NVIDIA L40S", "bf16", 362),
    ("NVIDIA H100 80GB HBM3", "fp8", 1979),
    ("NVIDIA H100 PCIe", "fp8", 1513),
    ("NVIDIA L40S", "fp8", 733),
    ("NVIDIA A100-SXM4-80GB", "fp32", 156),  # TF32
])
def test_peak_per_gpu_variant(monkeypatch, name, precision, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, note = flops.peak_for(torch.device("cuda", 0), precision)
    assert peak == pytest.approx(tflops * 1e12)
    assert name in note and f"{tflops} TFLOP/s" in note


def test_unknown_peaks_are_said_not_guessed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert flops.peak_for(torch.device("cuda", 0), "fp8") == (None, "MFU: not reported: NVIDIA A100-SXM4-80GB "
                                                              "has no fp8 tensor cores")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    peak, note = flops.peak_for(torch.device("cuda", 0))
    assert peak is None and "no peak FLOP/s known for Some Future GPU" in note
    assert flops.peak_for(torch.device("cuda", 0), override_tflops=500)[0] == 500e12


# -- environment ------------------------------------------------------------------------------
def test_worker_environment(monkeypatch):
    def env(*overrides):
        config = config_from_dict({}, list(overrides))
        return worker_environment(config.parallel, config.train.device)

    for name in ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    recorder = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    assert env("parallel.tp=2", "train.device=cuda") == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", **recorder}
    assert env("train.device=auto") == recorder  # dp only: FSDP/DDP overlap wants several hardware queues
    assert env("parallel.tp=2", "train.device=cpu") == {"CUDA_VISIBLE_DEVICES": ""}  # no NCCL, no recorder
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "0")  # the user's choice stands
    assert env("train.device=cuda") == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


def test_cpu_run_on_a_machine_with_a_gpu():
    """train.device=cpu where CUDA answers yes (a GPU login node) runs on the CPU emulation."""
    script = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
from kiln.log import quiet_third_party; quiet_third_party()
from kiln.config import config_from_dict
from kiln.model.builder import build_model
from kiln.parallel.backend import init_parallel
config = config_from_dict({}, ["train.device=cpu", "train.precision=fp32"])
ctx = init_parallel(config.train.device, config.train.seed, config.layout)
(model,) = build_model(config.model, config.parallel, config.train, ctx, vocab_size=256)
tokens = torch.randint(0, 256, (2, 16))
positions = torch.arange(16).expand(2, 16)
loss = model(tokens, positions, attention_mask=None, labels=tokens).mean()
loss.backward()
print(ctx.device, torch.cuda.is_available(), next(model.parameters()).device, bool(torch.isfinite(loss)))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-4:] == ["cpu", "False", "cpu", "True"]
