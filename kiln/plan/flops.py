"""Training FLOPs per token and per step, and accelerator peak throughput, for TFLOP/s and MFU.

Model FLOPs (what MFU counts, Chowdhery et al. 2022, "PaLM", appendix B) are 6 FLOPs per
parameter per token for the matmuls (2 forward, 4 backward) plus the attention scores; the
hardware also runs what activation recomputation repeats, which MFU leaves out.
"""

from __future__ import annotations

import torch

from kiln.config import ModelConfig
from kiln.plan.hardware import match_device_name
from kiln.plan.params import matmul_parameters_per_token

def flops_per_token(model: ModelConfig, vocab_size: int) -> float:
    """6 × (matmul parameters) + attention scores, per trained token (PaLM appendix B).

    The embedding lookup does no matmul and is left out; the output layer is counted.
    Attention uses the full (non-causal) 12·L·h·s term, as Megatron and torchtitan report it.
    MoE layers count the parameters a token is multiplied by (router, top_k and shared experts),
    not every expert's.
    """
    h, layers, s = model.hidden_size, model.num_layers, model.seq_len
    matmul_params = matmul_parameters_per_token(model) + vocab_size * h
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
    row = match_device_name(name)
    if row is None:
        return None, (f"MFU: not reported: no peak FLOP/s known for {name} "
                      f"(add it to kiln.plan.hardware.ACCELERATORS; TFLOP/s per GPU is still logged)")
    peak = row.peak(precision)
    if peak is None:
        return None, f"MFU: not reported: {name} has no fp8 tensor cores"
    kind = "tf32" if precision == "fp32" else precision
    return peak, f"MFU against {name} = {row.key}: {peak / 1e12:.0f} TFLOP/s dense {kind}"


def recompute_flops_per_token(model: ModelConfig, recompute: str) -> float:
    """FLOPs per token that activation recomputation adds to a step (not model FLOPs: MFU leaves them out).

    Full recomputation runs every transformer layer's forward again (2 FLOPs per layer parameter
    plus the 4·h·s of the attention scores); selective recomputation (megatron-core's default
    ``core_attn``) repeats the attention scores' forward only.
    """
    h, layers, s = model.hidden_size, model.num_layers, model.seq_len
    attention_forward = 4.0 * layers * h * s
    if recompute == "full":
        return 2.0 * matmul_parameters_per_token(model) + attention_forward
    return attention_forward if recompute == "selective" else 0.0


def narayanan_flops_per_iteration(batch: int, seq_len: int, layers: int, hidden: int, vocab: int,
                                  *, recompute: bool = True) -> float:
    """FLOPs of one training iteration of a GPT model (Narayanan et al. 2021, "Efficient Large-Scale
    Language Model Training on GPU Clusters Using Megatron-LM", section 5.1):
    96·B·s·l·h²·(1 + s/6h + V/16lh) with full activation recomputation, and, by the same
    counting, 72·B·s·l·h²·(1 + s/6h + V/12lh) without it.

    kiln's per-token count (:func:`flops_per_token` + :func:`recompute_flops_per_token`) gives
    the same number for a model of this shape (SwiGLU with ffn = 8h/3 has the 4h GELU MLP's FLOPs).
    """
    b, s, l, h, v = batch, seq_len, layers, hidden, vocab
    if recompute:
        return 96.0 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    return 72.0 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))
