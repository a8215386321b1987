"""Accelerators the planner and the MFU metric know: peak FLOP/s, memory, link bandwidths.

One row per part, from NVIDIA's data sheets. Peaks are dense (no 2:4 sparsity); TF32 (fp32
runs) is half the bf16 peak on every part listed. ``memory_gib`` is what
``torch.cuda.get_device_properties().total_memory`` reports on the part (a little under the
marketing number: "80 GB" is 79.2 GiB). Bandwidths are per GPU and per direction, in GB/s:
``nvlink`` inside a node (H100 SXM: 900 GB/s bidirectional = 450 each way), ``network``
between nodes (one 400 Gb/s NIC per GPU = 50 GB/s on an H100 cluster).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kiln.errors import KilnConfigError

GIB = 2**30


@dataclass(frozen=True, slots=True)
class Accelerator:
    name: str
    """The ``--gpu`` name of ``kiln plan``."""
    key: str
    """Matched against ``torch.cuda.get_device_name()``."""
    bf16_flops: float
    fp8_flops: float | None
    memory_gib: float
    hbm_gbps: float
    nvlink_gbps: float
    network_gbps: float
    gpus_per_node: int = 8

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak(self, precision: str) -> float | None:
        """Dense peak FLOP/s at a train.precision (fp32 runs use TF32), None without fp8 tensor cores."""
        if precision == "fp8":
            return self.fp8_flops
        return self.bf16_flops / 2 if precision == "fp32" else self.bf16_flops


# Matched in this order, so that a variant is found before its family ("H100 PCIe" before
# "H100", "GH200" before "H200"). The plain "H100" row is the SXM part ("NVIDIA H100 80GB HBM3").
ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("gh200", "GH200", 989e12, 1979e12, 94.5, 4000, 450, 50, gpus_per_node=4),
    Accelerator("h100-pcie", "H100 PCIe", 756e12, 1513e12, 79.2, 2000, 300, 50),
    Accelerator("h100-nvl", "H100 NVL", 835e12, 1671e12, 93.1, 3900, 300, 50),
    Accelerator("h200-nvl", "H200 NVL", 835e12, 1671e12, 139.8, 4800, 450, 50),
    Accelerator("h100", "H100", 989e12, 1979e12, 79.2, 3350, 450, 50),
    Accelerator("h200", "H200", 989e12, 1979e12, 139.8, 4800, 450, 50),
    Accelerator("h800-pcie", "H800 PCIe", 756e12, 1513e12, 79.2, 2000, 200, 50),
    Accelerator("h800", "H800", 989e12, 1979e12, 79.2, 3350, 200, 50),
    Accelerator("b200", "B200", 2250e12, 4500e12, 178.4, 8000, 900, 100),
    Accelerator("a100-40gb", "A100-SXM4-40GB", 312e12, None, 39.4, 1555, 300, 25),
    Accelerator("a100", "A100", 312e12, None, 79.2, 2039, 300, 25),
    Accelerator("a800", "A800", 312e12, None, 79.2, 2039, 200, 25),
    Accelerator("l40s", "L40S", 362e12, 733e12, 44.4, 864, 32, 25),
    Accelerator("l40", "L40", 181e12, 362e12, 44.4, 864, 32, 25),
    Accelerator("l4", "L4", 121e12, 242e12, 22.0, 300, 32, 25),
)


def match_device_name(name: str) -> Accelerator | None:
    """The row for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    return next((row for row in ACCELERATORS if row.key in name), None)


def accelerator(name: str, *, gpus_per_node: int | None = None, network_gbps: float | None = None) -> Accelerator:
    """The ``--gpu`` row: ``h100``, ``h200``, ``a100``, ``a100-40gb``, ``b200``, ``l40s``, ... ."""
    wanted = name.strip().lower().replace("_", "-")
    row = next((r for r in ACCELERATORS if r.name == wanted), None)
    if row is None:
        known = ", ".join(r.name for r in ACCELERATORS)
        raise KilnConfigError(f"--gpu {name}: unknown accelerator; known: {known} "
                              f"(add a row to kiln.plan.hardware.ACCELERATORS for another)")
    changes = {k: v for k, v in (("gpus_per_node", gpus_per_node), ("network_gbps", network_gbps)) if v}
    return replace(row, **changes) if changes else row
