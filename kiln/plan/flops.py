"""Training FLOPs per token and accelerator peak throughput, for TFLOP/s and MFU."""

from __future__ import annotations

import torch

from kiln.config import ModelConfig

# Dense bf16 peak (no sparsity), FLOP/s, by substring of the device name.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12}


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


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of this device, or None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None
