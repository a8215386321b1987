"""Training FLOPs per token and accelerator peak throughput, for TFLOP/s and MFU."""

from __future__ import annotations

import torch

from kiln.config import ModelConfig

# Dense peak FLOP/s (no 2:4 sparsity) of each accelerator, as (bf16, fp8), from NVIDIA's data
# sheets. Matched against torch.cuda.get_device_name() in this order, so that a variant is
# found before its family ("H100 PCIe" before "H100", "L40S" before "L40", "GH200" before
# "H200"). The plain "H100" row is the SXM part (its name is e.g. "NVIDIA H100 80GB HBM3").
# TF32 (fp32 runs) is half the bf16 peak on every part listed.
PEAKS: tuple[tuple[str, float, float | None], ...] = (
    ("GH200", 989e12, 1979e12),
    ("H100 PCIe", 756e12, 1513e12),
    ("H100 NVL", 835e12, 1671e12),
    ("H200 NVL", 835e12, 1671e12),
    ("H100", 989e12, 1979e12),
    ("H200", 989e12, 1979e12),
    ("H800 PCIe", 756e12, 1513e12),
    ("H800", 989e12, 1979e12),
    ("B200", 2250e12, 4500e12),
    ("A100", 312e12, None),
    ("A800", 312e12, None),
    ("L40S", 362e12, 733e12),
    ("L40", 181e12, 362e12),
    ("L4", 121e12, 242e12),
)


def flops_per_token(model: ModelConfig, vocab_size: int) -> float:
    """6 × (matmul parameters) + attention scores, per trained token (PaLM appendix B).

    The embedding lookup does no matmul and is left out; the output layer is counted.
    Attention uses the full (non-causal) 12·L·h·s term, as Megatron and torchtitan report it.
    """
    h, layers, s = model.hidden_size, model.num_layers, model.seq_len
    kv = model.query_groups * model.head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * model.ffn_size
    matmul_params = layers * per_layer + vocab_size * h
    return 6.0 * matmul_params + 12.0 * layers * h * s


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """Peak dense FLOP/s of this device at ``precision``, or None where unknown (CPU, other GPUs)."""
    return peak_for(device, precision)[0]


def peak_for(device: torch.device, precision: str = "bf16",
             override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s or None, the sentence a run logs at start to say which peak its MFU uses).

    ``override_tflops`` is train.peak_tflops: the user's number wins over the table.
    """
    if override_tflops:
        return override_tflops * 1e12, f"MFU against train.peak_tflops = {override_tflops:g} TFLOP/s"
    if device.type != "cuda":
        return None, "MFU: not reported on CPU (no peak FLOP/s)"
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp8 in PEAKS:
        if key in name:
            if precision == "fp8":
                if fp8 is None:
                    return None, f"MFU: not reported: {name} has no fp8 tensor cores"
                return fp8, f"MFU against {name} = {key}: {fp8 / 1e12:.0f} TFLOP/s dense fp8"
            peak, kind = (bf16 / 2, "tf32") if precision == "fp32" else (bf16, precision)
            return peak, f"MFU against {name} = {key}: {peak / 1e12:.0f} TFLOP/s dense {kind}"
    return None, (f"MFU: not reported: no peak FLOP/s known for {name} "
                  f"(add it to kiln.plan.flops.PEAKS; TFLOP/s per GPU is still logged)")
