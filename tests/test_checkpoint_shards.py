"""Each data-parallel rank saves and loads its own share of the optimizer state.

* below everything: a rank's flat range of a parameter is tiled exactly by the rectangles
  :func:`kiln.engine.flat_shards.flat_blocks` lists, and SwiGLU's two-tensor factory is cut
  at the right places; replicated tensors are handed to writers that balance the bytes;
* on 2 gloo ranks (DP=2): the megatron engine's distributed optimizer, ZeRO-1, ZeRO-3 and FSDP
  build their checkpoint state without a single collective, each rank writes 40-60% of the
  tensor bytes, and a load asks each rank for its own share only (about half of the state);
  the megatron checkpoint loads back exactly and into each of the other engines, whose own
  checkpoints then hold the same tensors;
* the optimizer state made for a load matches the optimizer class: with a stand-in for
  Transformer Engine's FusedAdam (its ``state_dict()`` looks every per-parameter key up in a
  per-state dtype map, so a per-parameter ``step`` raises KeyError), a save and a load of the
  distributed optimizer round-trip.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed


# -- flat ranges as rectangles -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 5), (2, 3, 1, 4)])
def test_flat_blocks_tile_every_range_exactly(shape):
    from kiln.engine.flat_shards import flat_blocks

    numel = math.prod(shape)
    values = torch.arange(numel).view(shape)
    for start in range(numel + 1):
        for stop in range(start, numel + 1):
            blocks = flat_blocks(shape, start, stop)
            assert len(blocks) <= 2 * len(shape) - 1
            pieces = [values[tuple(slice(o, o + s) for o, s in zip(offset, size))].reshape(-1)
                      for offset, size in blocks]
            got = torch.cat(pieces) if pieces else torch.empty(0, dtype=values.dtype)
            assert torch.equal(got, torch.arange(start, stop)), (shape, start, stop, blocks)


def _assemble(entries, global_shape) -> torch.Tensor:
    """A global tensor filled from ShardedTensors (NaN where none wrote)."""
    out = torch.full(global_shape, float("nan"))
    for entry in entries:
        region = tuple(slice(o, o + s) for o, s in
                       zip(entry.global_offset, (1,) * entry.prepend_axis_num + tuple(entry.local_shape)))
        out[region] = entry.data.reshape(out[region].shape).float()
    return out


def test_a_swiglu_factory_is_cut_where_its_two_tensors_are():
    """fc1 of a SwiGLU MLP (gate and up rows stacked in one parameter) is stored as two halves
    of the global tensor; a rank's flat range lands in both, at their global places."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    from kiln.engine.flat_shards import flat_entries

    param = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)  # 4 gate rows, 4 up rows; TP rank 1 of 2
    layer = (0, 1, 2)  # layer 1 of 2 layers (a prepended axis)
    whole = ShardedTensor.from_rank_offsets("fc1", param, layer, (1, 1, 2), replica_id=(0, 0, 3), prepend_axis_num=1)
    factory = apply_swiglu_sharded_factory(whole, (layer,))
    reference = _assemble(list(nested_values(factory.build())), (2, 16, 3))
    start, stop = 5, 20  # rows 1.67 .. 6.67: the end of the gate half, the start of the up half
    entries = flat_entries(factory, "optimizer.state.exp_avg.", param.view(-1)[start:stop], start)
    assert {e.key for e in entries} == {"optimizer.state.exp_avg.fc1"}
    assert all(e.replica_id == (0, 0, 0) and e.axis_fragmentations is None for e in entries)
    got = _assemble(entries, (2, 16, 3))
    written = ~got.isnan()
    assert int(written.sum()) == stop - start
    assert torch.equal(got[written], reference[written])


def test_replicated_tensors_are_handed_out_to_balance_bytes():
    from kiln.engine.megatron_checkpoint import balanced_owners

    assert balanced_owners([100, 60, 50, 10], 2) == [0, 1, 1, 0]  # 110 and 110
    assert set(balanced_owners([100, 60, 50, 10], 1)) == {0}


# -- on 2 ranks --------------------------------------------------------------------------------
SETTINGS = ["model.vocab_size=256", "train.precision=fp32", "train.device=cpu", "train.micro_batch_size=2",
            "train.global_batch_size=4", "logging.wandb=disabled", "optim.warmup_steps=1"]
TARGETS = {"fsdp": ["parallel.engine=fsdp"],
           "zero1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
           "zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"]}


class _Counter:
    """The trainer's counters, as a checkpoint part."""

    def state_dict(self) -> dict:
        return {"step": 2, "consumed_samples": 8, "consumed_tokens": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


class _CollectiveCounter:
    """Counts calls of torch.distributed's collectives and of DTensor's functional ones."""

    NAMES = ("all_gather", "all_gather_into_tensor", "gather", "all_reduce", "broadcast", "reduce_scatter_tensor",
             "all_to_all_single", "all_gather_object", "broadcast_object_list", "all_gather_tensor",
             "reduce_scatter_tensor")

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        self.calls: list[str] = []
        self.patched = []
        for module in (dist, funcol):
            for name in self.NAMES:
                original = getattr(module, name, None)
                if original is None:
                    continue

                def counted(*args, _original=original, _name=name, **kwargs):
                    self.calls.append(_name)
                    return _original(*args, **kwargs)

                setattr(module, name, counted)
                self.patched.append((module, name, original))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in self.patched:
            setattr(module, name, original)


def _tensor_numel(state) -> int:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return sum(e.data.numel() for e in nested_values(state) if isinstance(e, ShardedTensor))


def _engine(overrides, ctx, run_dir):
    from kiln.checkpoint.manager import CheckpointManager
    from kiln.config import config_from_dict
    from kiln.train import build_run_engine

    config = config_from_dict({}, [*SETTINGS, *overrides, f"train.run_dir={run_dir}"])
    manager = CheckpointManager(config.checkpoint, ctx, run_dir, config.model, config.to_dict())
    manager.prepare()
    return build_run_engine(config, ctx, 256), manager


def _save_without_collectives(engine, manager) -> dict:
    """Save at step 2; what the engine's sharded state asked for while it was built."""
    with _CollectiveCounter() as counter:
        state = engine.sharded_state_dict(is_loading=False)
    manager.save(2, engine, {"trainer": _Counter()}, blocking=True)
    return {"collectives": counter.calls, "optimizer_numel": _tensor_numel(state["optimizer"])}


def _load(engine, manager, path: Path) -> dict:
    """Load ``path``; how many optimizer-state elements this rank asked for."""
    from kiln.engine.base import SavedEngine

    requested = []
    original = engine.sharded_state_dict

    def recording(*, is_loading, saved=None):
        state = original(is_loading=is_loading, saved=saved)
        requested.append(_tensor_numel(state["optimizer"]) + _tensor_numel(
            {k: v for k, v in state.get("model0", {}).items() if isinstance(saved, SavedEngine)
             and saved.checkpoint_format == "portable"}))
        return state

    engine.sharded_state_dict = recording
    manager.load(path, engine, {"trainer": _Counter()})
    del engine.sharded_state_dict
    return {"requested_numel": requested[0]}


def _optimizer_values(engine) -> list[torch.Tensor]:
    inners = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
    return [value.detach().clone() for inner in inners for group in inner.optimizer.param_groups
            for param in group["params"] for value in (param, *(inner.optimizer.state[param][name]
                                                              for name in sorted(inner.optimizer.state[param])))]


def _save_and_load_across_engines(rank: int, run_dir: Path) -> dict:
    from kiln.config import config_from_dict
    from kiln.parallel.backend import destroy_parallel, init_parallel

    layout = config_from_dict({}, SETTINGS).layout
    ctx = init_parallel("cpu", 1234, layout)
    report: dict = {}
    engine, manager = _engine(["optim.distributed_optimizer=true"], ctx, run_dir / "megatron")
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):
        batch = [{"tokens": torch.randint(0, 256, (2, 129), generator=generator)}]
        engine.optimizer_step(engine.measure_gradients(engine.forward_backward(batch)))
    report["megatron"] = _save_without_collectives(engine, manager)
    saved = manager.latest()
    before = _optimizer_values(engine)
    fresh, fresh_manager = _engine(["optim.distributed_optimizer=true"], ctx, run_dir / "megatron-again")
    report["megatron-load"] = _load(fresh, fresh_manager, saved)
    report["megatron-roundtrip"] = all(torch.equal(a, b) for a, b in zip(before, _optimizer_values(fresh)))
    for name, overrides in TARGETS.items():  # the megatron checkpoint into each portable engine, then saved by it
        target, target_manager = _engine(overrides, ctx, run_dir / name)
        report[f"{name}-load"] = _load(target, target_manager, saved)
        report[name] = _save_without_collectives(target, target_manager)
        target.close()
    for each in (manager, fresh_manager):
        each.close()
    destroy_parallel()
    return report


def _bytes_by_rank(step_dir: Path) -> dict[int, int]:
    written: dict[int, int] = {}
    for path in step_dir.glob("__*_*.distcp"):
        rank = int(re.match(r"__(\d+)_", path.name).group(1))
        written[rank] = written.get(rank, 0) + path.stat().st_size
    return written


def _full_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    from kiln.checkpoint.tools import list_entries, load_full_tensors, read_dcp_index

    return load_full_tensors(step_dir, list_entries(read_dcp_index(step_dir))[0])


@pytest.mark.slow
def test_each_rank_saves_and_loads_its_own_share_in_every_engine(tmp_path):
    reports = run_distributed(_save_and_load_across_engines, 2, tmp_path, timeout_s=900)
    megatron_total = sum(report["megatron"]["optimizer_numel"] for report in reports)
    for rank, report in enumerate(reports):
        for name in ("megatron", *TARGETS):
            # Built from the live state: no gather, no all-reduce (the old way gathered it all on every rank).
            assert report[name]["collectives"] == [], f"rank {rank}, {name}: {report[name]['collectives']}"
        assert report["megatron-roundtrip"], f"rank {rank}: the optimizer state did not load back exactly"
        # Each rank asks for its own half of the optimizer state (moments and masters), not all of it.
        for name in ("megatron-load", *(f"{t}-load" for t in TARGETS)):
            share = report[name]["requested_numel"] / megatron_total
            assert 0.3 < share < 0.7, f"rank {rank}, {name}: asked for {share:.2f} of the optimizer state"
    for name in ("megatron", *TARGETS):
        step_dir = tmp_path / name / "checkpoints" / "step_000002"
        written = _bytes_by_rank(step_dir)
        total = sum(written.values())
        assert sorted(written) == [0, 1]
        assert all(0.4 < part / total < 0.6 for part in written.values()), f"{name}: bytes by rank {written}"
    # What each portable engine loaded is what it saves again: the megatron checkpoint's tensors.
    reference = _full_tensors(tmp_path / "megatron" / "checkpoints" / "step_000002")
    for name in TARGETS:
        tensors = _full_tensors(tmp_path / name / "checkpoints" / "step_000002")
        compared = [key for key in tensors if key in reference]
        assert any(key.startswith("optimizer.state.exp_avg.") for key in compared)
        assert len(compared) == len(tensors), f"{name}: {sorted(set(tensors) - set(reference))}"
        for key in compared:
            assert torch.equal(tensors[key], reference[key]), f"{name}: {key} differs"


# -- the optimizer state made for a load matches the optimizer class ---------------------------------
class FusedAdamStandIn(torch.optim.Optimizer):
    """What Transformer Engine's FusedAdam keeps and how its state_dict reads it: per parameter
    only ``exp_avg`` and ``exp_avg_sq`` (a dtype per state name in ``name_to_dtype_map``), the
    step in the param group, and a ``state_dict()``/``load_state_dict()`` that look every
    per-parameter key up in that map (a ``step`` there raises KeyError). Plain AdamW math on CPU."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True, **_):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "bias_correction": True})
        self.name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master_param": torch.float32}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (beta1, beta2), t = group["betas"], group["step"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                param.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))

    def state_dict(self):
        state_dict = super().state_dict()
        for index, values in state_dict["state"].items():
            state_dict["state"][index] = {name: values[name].to(self.name_to_dtype_map[name]) for name in values}
        return state_dict

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for values in self.state.values():
            for name in values:
                values[name] = values[name].to(self.name_to_dtype_map[name])


def _with_fused_adam_stand_in(rank: int, run_dir: Path) -> dict:
    """megatron-core as it runs with Transformer Engine installed (its FusedAdam and the code
    paths for it), the optimizer swapped for the stand-in."""
    import megatron.core.optimizer as megatron_optimizer
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer

    from kiln.config import config_from_dict
    from kiln.parallel.backend import destroy_parallel, init_parallel

    megatron_optimizer.USING_PYTORCH_OPTIMIZER = False
    megatron_optimizer.Adam = distrib_optimizer.Adam = FusedAdamStandIn
    distrib_optimizer.HAVE_APEX_OR_TE = distrib_optimizer.USING_TE_OPTIMIZER = True
    ctx = init_parallel("cpu", 1234, config_from_dict({}, SETTINGS).layout)
    engine, manager = _engine(["optim.distributed_optimizer=true"], ctx, run_dir / "saved")
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):
        batch = [{"tokens": torch.randint(0, 256, (2, 129), generator=generator)}]
        engine.optimizer_step(engine.measure_gradients(engine.forward_backward(batch)))
    manager.save(2, engine, {"trainer": _Counter()}, blocking=True)
    fresh, fresh_manager = _engine(["optim.distributed_optimizer=true"], ctx, run_dir / "resumed")
    fresh_manager.load(manager.latest(), fresh, {"trainer": _Counter()})
    (inner,) = fresh.optimizer.chained_optimizers
    report = {
        "class": type(inner.optimizer).__name__,
        "same": all(torch.equal(a, b) for a, b in zip(_optimizer_values(engine), _optimizer_values(fresh))),
        "state_keys": sorted({key for state in inner.optimizer.state.values() for key in state}),
        "group_steps": sorted({group.get("step") for group in inner.optimizer.param_groups if group["params"]}),
        "adam_step": fresh.state_dict()["adam_step"],
    }
    for each in (manager, fresh_manager):
        each.close()
    destroy_parallel()
    return report


def test_a_fused_adam_style_optimizer_resumes_without_a_per_parameter_step(tmp_path):
    for report in run_distributed(_with_fused_adam_stand_in, 2, tmp_path):
        assert report["class"] == "FusedAdamStandIn"
        assert report["state_keys"] == ["exp_avg", "exp_avg_sq"]  # its own keys: no per-parameter step
        assert report["same"] and report["group_steps"] == [2] and report["adam_step"] == 2
