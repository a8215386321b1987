"""What differs between the megatron-core versions kiln supports, in one place.

kiln runs on megatron-core 0.16.1 (the registry's newest for Python 3.11) and 0.19.2 (Python
3.12). Code elsewhere calls megatron-core the same way on both; where an API changed, it asks
this module instead of testing versions itself.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@functools.cache
def megatron_core_version() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core."""
    major, minor = version("megatron-core").split(".")[:2]
    return int(major), int(minor)


def async_save_kwargs() -> dict[str, str]:
    """Extra arguments for ``dist_checkpointing.save(..., async_sharded_save=True)``.

    From 0.17 on, the async save defaults to ``async_strategy="nvrx"``, which needs the
    nvidia-resiliency-ext package; kiln asks for megatron-core's own writer ("mcore"), the one
    0.16 always used and the one whose results queue kiln's checkpoint manager starts itself.
    """
    return {} if megatron_core_version() < (0, 17) else {"async_strategy": "mcore"}


def check_can_read_checkpoint(saved_version: str, where) -> None:
    """Refuse, naming why, a checkpoint this megatron-core cannot read.

    megatron-core 0.19 keeps a checkpoint's common (non-tensor) state inside the DCP files;
    0.16 reads it only from a ``common.pt`` file, so it cannot load what 0.19 saved (0.19
    reads both). ``saved_version`` is the megatron-core version in the checkpoint's kiln.json.
    """
    try:
        saved = tuple(int(part) for part in saved_version.split(".")[:2])
    except ValueError:  # "unknown": a checkpoint that did not record it
        return
    if saved >= (0, 19) > megatron_core_version():
        from kiln.errors import KilnCheckpointError

        raise KilnCheckpointError(
            f"checkpoint {where} was saved with megatron-core {saved_version}, which keeps state this "
            f"megatron-core ({version('megatron-core')}) cannot read; resume it on Python 3.12 with "
            f"megatron-core 0.19 (make ... PYTHON=python3.12 VENV=.venv312), or export its weights "
            f"with `kiln ckpt convert`")


def allow_moe_without_transformer_engine() -> None:
    """megatron-core 0.16's MoE router calls ``te_general_gemm`` when it is not None, but defines the
    name only when Transformer Engine imports (0.19 sets it to None otherwise): without TE (CPU, or a
    GPU without kiln[gpu]) the router's GEMM raises NameError. Give it the None 0.19 gives."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def moe_tracked_values() -> dict[str, "torch.Tensor"]:
    """megatron-core's per-layer MoE router metrics (aux losses, z-loss) since they were last zeroed:
    name → values [num_layers]. 0.16 keeps them in a dict (``get_moe_layer_wise_logging_tracker``),
    0.19 in a ``MoEMetricsTracker`` (the dict accessor is deprecated there)."""
    if megatron_core_version() < (0, 19):
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return {name: entry["values"] for name, entry in get_moe_layer_wise_logging_tracker().items()}
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    return {name: entry.values for name, entry in get_moe_metrics_tracker().metrics.items()}


def zero_moe_tracked_values() -> None:
    """Start the next step's router metrics from zero."""
    for values in moe_tracked_values().values():
        values.zero_()


def forget_moe_tracked_values() -> None:
    """Drop the router metrics altogether (they are sized for one model's layers): for a process that
    builds another model."""
    if megatron_core_version() < (0, 19):
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
        return
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()
