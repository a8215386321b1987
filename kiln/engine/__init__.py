"""Training engines, looked up by name: the one registry.

``parallel.engine`` names one of :data:`ENGINES`; each entry is a module of this package that
defines an :class:`~kiln.engine.base.Engine` subclass as ``ENGINE``. Adding an engine is one
file here plus one line below.
"""

from __future__ import annotations

import importlib

from kiln.errors import KilnConfigError

ENGINES = {
    "megatron": "kiln.engine.megatron",  # megatron-core DDP, (distributed) optimizer, pipeline schedules
    "deepspeed": "kiln.engine.deepspeed",  # DeepSpeed ZeRO-1/2/3 over megatron-core TP
    "fsdp": "kiln.engine.fsdp",  # torch FSDP2 (fully_shard) over megatron-core TP
}


def check_engine_name(name: str) -> None:
    if name not in ENGINES:
        raise KilnConfigError(f"parallel.engine: {name!r} is not an engine; valid: {', '.join(ENGINES)}")


def engine_class(name: str):
    """The Engine subclass registered as ``name``."""
    check_engine_name(name)
    return importlib.import_module(ENGINES[name]).ENGINE


def engines_reading(checkpoint_format: str) -> list[str]:
    """Names of the engines that can load checkpoints of this format."""
    return [name for name in ENGINES
            if checkpoint_format in (engine_class(name).checkpoint_format, *engine_class(name).reads_formats)]


def build_engine(name: str, model_parts, **sections):
    """Wrap this rank's model parts in the named engine (sections: model, optim, parallel, train, ctx, …)."""
    return engine_class(name)(model_parts, **sections)
