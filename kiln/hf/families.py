"""Which Hugging Face architecture a model is: kiln.hf.llama (dense) or kiln.hf.mixtral (MoE).

Both modules offer the same functions: ``shape_of(model, vocab_size)`` (a kiln ``ModelConfig``'s
sizes, refusing what the architecture cannot hold), ``hf_config(model, shape, dtype, eos_id,
bos_id)``, ``model_section_from_hf(config, where)``, and ``ARCHITECTURE`` / ``FORMAT``; the tensor
mapping itself (kiln.hf.llama's functions) follows the shape it is given.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from kiln.hf import llama, mixtral


def of_model(model) -> ModuleType:
    """A kiln ``ModelConfig``'s: Mixtral with model.moe, else Llama."""
    return mixtral if model.moe.enabled else llama


def of_hf_config(config: dict[str, Any]) -> ModuleType:
    """An HF ``config.json``'s, by model_type (Llama's refuses any type but its own, naming both)."""
    return mixtral if config.get("model_type") == "mixtral" else llama
