"""megatron-core optimizer checkpoints: the format choice and two workarounds for 0.16."""

from __future__ import annotations

import contextlib

import torch

# megatron-core's distributed optimizer format that reshards over TP, PP and DP (its
# "fully_sharded_model_space" is not supported by the torch_dist backend in 0.16; this one
# gathers the state over the DP group to save it, which costs memory on DP rank 0).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def optimizer_step_count(optimizer) -> int:
    """Adam's step counter (0 before the first step)."""
    for inner in _inner_optimizers(optimizer):
        for state in inner.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
    return 0


def ensure_adam_state(optimizer) -> None:
    """Give every parameter an (all-zero) Adam state before a load fills it in place.

    megatron-core's distributed optimizer reads the state's ``step`` while building the sharded
    state dict to load into, and a fresh torch Adam has no state until its first step.
    """
    for inner in _inner_optimizers(optimizer):
        adam = inner.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                         "exp_avg_sq": torch.zeros_like(param)}


@contextlib.contextmanager
def torch_adam_load_fixes(optimizer):
    """Work around megatron-core 0.16 loading torch Adam state into the distributed optimizer.

    Without TE/Apex the inner optimizer is torch's Adam, whose per-parameter state holds a
    ``step``. Two bugs on that path:

    * the fully-reshardable loader copies every state key from the checkpoint's tensors,
      which never include ``step`` (saved once, restored before), and fails with KeyError;
      handing it the current ``step`` makes that copy a no-op;
    * the restored ``step`` is one tensor object shared by every parameter, so each optimizer
      step would advance it once per parameter; each parameter gets its own copy after.
    """
    patched = []
    for inner in _inner_optimizers(optimizer):
        setter = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def with_step(model_param, tensors, inner=inner, setter=setter):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
            step = inner.optimizer.state[main_param].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            return setter(model_param, tensors)

        inner._set_main_param_and_optimizer_states = with_step
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # back to the class method
            for state in inner.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
