"""``kiln plan``: one plan of a config on N GPUs (memory, throughput, compute-optimal size), the
layouts that fit, and the memory check ``kiln train`` runs before launch.

Everything is arithmetic on the run config and :class:`~kiln.parallel.layout.ParallelLayout`,
the same ones ``kiln train`` validates, so a layout the planner accepts is one training accepts.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from kiln.config import RunConfig, config_from_dict
from kiln.engine import ENGINES, engine_class
from kiln.errors import KilnConfigError
from kiln.parallel.layout import ParallelLayout
from kiln.plan.hardware import Accelerator
from kiln.plan.memory import MemoryEstimate, estimate_memory, human_bytes
from kiln.plan.params import count_parameters
from kiln.plan.performance import EFFICIENCY, Throughput, predict_throughput
from kiln.plan.scaling import ScalingReport, scaling_report

log = logging.getLogger(__name__)
MEMORY_CHECKED = "KILN_MEMORY_CHECKED"
"""Set by ``kiln train``'s launcher once it has run the memory check; its workers then skip theirs."""


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    layout: ParallelLayout
    vocab_size: int
    memory: MemoryEstimate
    throughput: Throughput | None
    """None where the accelerator has no tensor cores for the run's precision."""

    def layout_json(self) -> dict:
        p, t = self.config.parallel, self.config.train
        engine = engine_class(p.engine)
        return {"tp": self.layout.tp, "pp": self.layout.pp, "cp": self.layout.cp, "dp": self.layout.dp,
                "virtual_pp": self.layout.virtual_pp, "engine": p.engine, "engine_description": engine.describe(p),
                "engine_settings": engine.plan_settings(p, self.config.optim),
                "sequence_parallel": p.sequence_parallel, "micro_batch_size": t.micro_batch_size,
                "recompute": t.recompute, "ep": self.layout.ep, "expert_tp": self.layout.expert_tp,
                "expert_dp": self.layout.expert_dp}

    def memory_json(self) -> dict:
        m = self.memory
        return {"stage": m.stage, "bytes": m.items, "total_bytes": m.total, "capacity_bytes": m.capacity,
                "fits": m.fits, "biggest": m.biggest, "notes": m.notes}


def make_plan(config: RunConfig, world_size: int, vocab_size: int, accel: Accelerator, *, device_type: str = "cuda",
              capacity: int | None = None, efficiency: float = EFFICIENCY) -> Plan:
    layout = config.layout(world_size)  # raises the KilnConfigError a launch would
    memory = estimate_memory(config, layout, vocab_size, device_type,
                             capacity=capacity if capacity is not None else accel.memory_bytes)
    throughput = None
    if accel.peak(config.train.precision) is not None:
        throughput = predict_throughput(config, layout, vocab_size, accel, efficiency)
    return Plan(config, layout, vocab_size, memory, throughput)


def scaling_for(config: RunConfig, vocab_size: int, budget_flops: float | None) -> ScalingReport:
    """The compute-optimal report of ``config``. An MoE model counts its active parameters (the total for
    a dense model): they set its training compute, 6·N·D, which is what the dense fits trade against tokens."""
    params = count_parameters(config.model, vocab_size)
    tokens = float(config.train.max_steps * config.train.global_batch_size * config.model.seq_len)
    return scaling_report(params.active, tokens, budget_flops, moe_total=params.total if config.model.moe.enabled else None)


# -- variants of a config -------------------------------------------------------------------------
def with_overrides(config: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """A validated copy of ``config`` with dotted settings changed (raises KilnConfigError)."""
    raw = config.to_dict()
    return config_from_dict(raw, [f"{key}={_yaml(value)}" for key, value in overrides.items()])


def _yaml(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def _variant_plan(config: RunConfig, change: dict[str, object], world_size: int, vocab_size: int,
                  accel: Accelerator, **plan_options) -> Plan | None:
    """The plan of ``config`` with ``change``, or None where that is no valid layout for this model, batch
    or engine."""
    try:
        return make_plan(with_overrides(config, change), world_size, vocab_size, accel, **plan_options)
    except (KilnConfigError, ValueError):
        return None


def _expert_layouts(config: RunConfig, world_size: int, tp: int) -> list[dict[str, object]]:
    """The (ep, expert_tp) settings to try with ``tp`` for an MoE model: ep dividing num_experts, expert_tp
    as tp or 1 (validation drops the rest); a dense model's only one is ep 1."""
    moe = config.model.moe
    if not moe.enabled:
        return [{}]
    eps = [ep for ep in range(1, min(moe.num_experts, world_size) + 1) if moe.num_experts % ep == 0]
    expert_tps = [None, 1] if tp > 1 else [None]
    return [{"parallel.ep": ep, "parallel.expert_tp": expert_tp} for ep in eps for expert_tp in expert_tps]


def search_layouts(config: RunConfig, world_size: int, vocab_size: int, accel: Accelerator, *,
                   efficiency: float = EFFICIENCY, limit: int | None = None) -> list[Plan]:
    """Every valid (tp, pp, cp, ep and expert_tp for MoE models, engine/ZeRO stage, micro-batch, recompute)
    on ``world_size`` GPUs that is predicted to fit, fastest first. TP stays inside a node; CP keeps at
    least 4K tokens per rank."""
    m, t = config.model, config.train
    tps = [x for x in _powers_of_two(min(accel.gpus_per_node, world_size)) if m.num_attention_heads % x == 0]
    pps = [x for x in range(1, min(m.num_layers, world_size) + 1) if world_size % x == 0 and m.num_layers % x == 0]
    # CP pays off for long sequences only: below ~4K tokens per rank its ring hops and smaller attention
    # blocks cost more than the roofline sees.
    cps = [x for x in _powers_of_two(world_size) if x == 1 or m.seq_len // x >= 4096]
    # MoE models run on the engines that support them only: the others would refuse every layout
    engines = [variant for name in ENGINES if not m.moe.enabled or engine_class(name).moe_support is None
               for variant in engine_class(name).plan_variants()]
    micro_batches = [x for x in _powers_of_two(t.global_batch_size) if x <= 16]
    plans = []
    for tp, pp, cp, engine, micro, recompute in itertools.product(
            tps, pps, cps, engines, micro_batches, ("none", "selective", "full")):
        if world_size % (tp * pp * cp):
            continue
        for experts in _expert_layouts(config, world_size, tp):
            settings = {"parallel.tp": tp, "parallel.pp": pp, "parallel.cp": cp, "parallel.dp": None,
                        "parallel.virtual_pp": None, "parallel.sequence_parallel": tp > 1,
                        "train.micro_batch_size": micro, "train.recompute": recompute, **engine, **experts}
            plan = _variant_plan(config, settings, world_size, vocab_size, accel, efficiency=efficiency)
            if plan is not None and plan.memory.fits and plan.throughput is not None:
                plans.append(plan)
    plans.sort(key=lambda plan: -plan.throughput.tokens_per_s)
    return plans[:limit] if limit else plans


# -- the check before launch ----------------------------------------------------------------------
def cheapest_fix(config: RunConfig, world_size: int, vocab_size: int, accel: Accelerator, device_type: str,
                 capacity: int) -> tuple[str, Plan] | None:
    """The one-setting change that fits with the best predicted throughput, as (overrides, plan)."""
    p, t = config.parallel, config.train
    candidates: list[dict[str, object]] = []
    if t.recompute != "full":
        candidates += [{"train.recompute": "selective"}, {"train.recompute": "full"}]
    micro = t.micro_batch_size // 2
    while micro >= 1:
        candidates.append({"train.micro_batch_size": micro})
        micro //= 2
    candidates += engine_class(p.engine).memory_saving_changes(p, config.optim)
    tp = p.tp * 2
    while tp <= min(world_size, accel.gpus_per_node):
        candidates.append({"parallel.tp": tp, "parallel.dp": None, "parallel.sequence_parallel": True})
        tp *= 2
    pp = p.pp * 2
    while pp <= world_size:  # engines without pipelines refuse these in validation
        candidates.append({"parallel.pp": pp, "parallel.dp": None, "parallel.virtual_pp": None})
        pp *= 2
    moe = config.model.moe
    if moe.enabled:  # a larger ep: each rank holds fewer experts (validation refuses what a layout cannot carve out)
        for ep in range(p.ep + 1, min(world_size, moe.num_experts) + 1):
            if moe.num_experts % ep == 0:
                candidates.append({"parallel.ep": ep})
                if p.expert_tp_size > 1:
                    candidates.append({"parallel.ep": ep, "parallel.expert_tp": 1})
    fits = []
    for change in candidates:
        plan = _variant_plan(config, change, world_size, vocab_size, accel, device_type=device_type,
                             capacity=capacity)
        if plan is not None and plan.memory.fits:
            speed = plan.throughput.tokens_per_s if plan.throughput else 0.0
            fits.append((speed, " ".join(f"{k}={_yaml(v)}" for k, v in change.items()), plan))
    if not fits:
        return None
    _, overrides, plan = max(fits, key=lambda item: item[0])
    return overrides, plan


def check_memory(config: RunConfig, world_size: int, vocab_size: int, accel: Accelerator, device_type: str,
                 capacity: int, where: str) -> MemoryEstimate:
    """Raise KilnConfigError when the run is predicted not to fit ``capacity`` bytes per rank,
    naming the biggest item and the cheapest change that fits."""
    plan = make_plan(config, world_size, vocab_size, accel, device_type=device_type, capacity=capacity)
    memory = plan.memory
    if memory.fits:
        return memory
    items = ", ".join(f"{name} {human_bytes(n)}" for name, n in sorted(memory.items.items(), key=lambda kv: -kv[1]) if n)
    fix = cheapest_fix(config, world_size, vocab_size, accel, device_type, capacity)
    advice = (f"the cheapest change that fits is {fix[0]} (predicted {human_bytes(fix[1].memory.total)})" if fix
              else "no single change fits: use more GPUs, or `kiln plan CONFIG --gpus N --search` to see what does")
    raise KilnConfigError(
        f"predicted not to fit: {human_bytes(memory.total)} per rank on pipeline stage {memory.stage} > "
        f"{human_bytes(capacity)} {where}; biggest is {memory.biggest} ({items}); {advice}; "
        f"`kiln plan CONFIG --gpus {world_size}` shows the whole estimate, --no-memory-check skips this check")


# -- device capacity ------------------------------------------------------------------------------
def host_memory() -> int | None:
    """MemTotal of this node in bytes (Linux), None elsewhere. The total, not what is free now: the
    check asks whether the run can fit this node, and must not flap with other jobs' usage."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def visible_gpus() -> tuple[str, int] | None:
    """(name, memory bytes of the smallest) of this node's GPUs from nvidia-smi, without creating a
    CUDA context in the calling process; None without nvidia-smi."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        rows = [line.rsplit(",", 1) for line in out.strip().splitlines() if "," in line]
        return min(((name.strip(), int(float(mib)) * 2**20) for name, mib in rows), key=lambda row: row[1])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def check_memory_before_launch(config: RunConfig, world_size: int, procs_per_node: int, device_type: str) -> bool:
    """``kiln train``'s check, in the launcher: True when it ran (the workers then skip theirs).

    GPUs: each rank against its GPU's memory (nvidia-smi); CPU: the node's memory shared
    by its worker processes. Raises KilnConfigError for a layout predicted not to fit.
    """
    from kiln.plan.dry_run import resolve_vocab_size

    if not config.train.memory_check:
        return False
    limit = _device_limit(device_type, visible_gpus() if device_type == "cuda" else None, procs_per_node)
    if limit is None:
        return False  # no nvidia-smi: the workers check against torch's view of their device
    check_memory(config, world_size, resolve_vocab_size(config.model, config.data), device_type=device_type,
                 **limit)
    return True


def check_memory_in_worker(config: RunConfig, world_size: int, vocab_size: int, device) -> None:
    """The same check in a worker started without ``kiln train``'s launcher (torchrun, srun)."""
    import os

    if not config.train.memory_check:
        return
    gpu = None
    if device.type == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        gpu = props.name, props.total_memory
    limit = _device_limit(device.type, gpu, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if limit is not None:
        check_memory(config, world_size, vocab_size, device_type=device.type, **limit)


def _device_limit(device_type: str, gpu: tuple[str, int] | None, procs_per_node: int) -> dict | None:
    """``accel``, ``capacity`` and ``where`` for :func:`check_memory`: a GPU (name, bytes), or on CPU the
    node's memory shared by its processes; None where it cannot be known."""
    from kiln.plan.hardware import match_device_name

    if device_type == "cuda":
        if gpu is None:
            return None
        name, capacity = gpu
        return {"accel": match_device_name(name) or _ranking_accelerator(), "capacity": capacity,
                "where": f"of {name} memory"}
    node_memory = host_memory()
    if node_memory is None:
        return None
    return {"accel": _ranking_accelerator(), "capacity": node_memory // procs_per_node,
            "where": f"(this node's memory {human_bytes(node_memory)} / {procs_per_node} processes)"}


def _ranking_accelerator() -> Accelerator:
    """Where the device has no row (CPU), fixes are still ranked by an H100's predicted throughput."""
    from kiln.plan.hardware import accelerator

    return accelerator("h100")
