"""What differs between the megatron-core versions kiln supports, in one place.

kiln runs on megatron-core 0.16.1 (the registry's newest for Python 3.11) and 0.19.2 (Python
3.12). Code elsewhere calls megatron-core the same way on both; where an API changed, it asks
this module instead of testing versions itself.
"""

from __future__ import annotations

import functools
from importlib.metadata import version


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
