"""``kiln plan CONFIG --gpus N [--gpu h100] [--json] [--search] [--budget-flops F | --budget-gpu-hours H]``.

The JSON (``--json``) has these keys:

* ``config``, ``gpus``, ``gpu`` (the accelerator row: name, peak, memory, bandwidths);
* ``layout``: tp, pp, cp, dp, virtual_pp, engine, engine_description, engine_settings (the
  engine's memory settings: distributed_optimizer; zero_stage and offloads; reshard_after_forward),
  sequence_parallel, micro_batch_size, recompute, ep, expert_tp, expert_dp (the expert layout of
  MoE layers; 1, tp × cp and dp for a dense model);
* ``moe``: null for a dense model, else num_experts, top_k, shared_experts, expert_ffn_size,
  moe_layers (0-based), routing (in words);
* ``parameters``: total, active (per token: an MoE model's routed experts count top_k of num_experts;
  equal to total for a dense model), non_embedding, per_rank (per pipeline stage), experts_per_rank
  (of per_rank, the routed experts: divided over ep × expert_tp);
* ``memory``: ``bytes`` per component (parameters, gradients, optimizer, activations,
  output_and_loss, buffers, allocator_and_context), ``total_bytes``, ``capacity_bytes``,
  ``fits``, ``biggest``, ``stage`` (the pipeline stage counted), ``notes``;
* ``throughput``: flops_per_token (from active parameters), model_flops_per_step,
  hardware_flops_per_step, step_time_s, tokens_per_s, tokens_per_s_per_gpu, mfu, ``breakdown_s``
  (compute, tp_comm, ep_comm, cp_comm_exposed, pipeline_bubble, dp_comm_exposed, optimizer),
  ``assumptions`` (with expert_dispatch for MoE models); throughput is null without tensor cores for
  the precision;
* ``scaling``: parameters (an MoE model's active ones: the fits are for dense models, see
  kiln.plan.scaling), moe_total_parameters (null for a dense model), tokens, tokens_per_parameter,
  chinchilla_optimal_tokens, training_flops, predicted_loss, budget_flops, ``optimal`` (approach 1
  and 3: parameters, tokens, predicted_loss);
* ``search`` (with ``--search``): the layouts that fit, fastest first, each with ``layout``,
  ``memory_total_bytes``, ``tokens_per_s``, ``mfu``, ``step_time_s``.
"""

from __future__ import annotations

import argparse
import json

from kiln.plan.hardware import ACCELERATORS, Accelerator, accelerator
from kiln.plan.memory import GIB, human_bytes
from kiln.plan.params import human
from kiln.plan.performance import EFFICIENCY


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU, FLOPs, MFU and compute-optimal size of a config, before launch")
    p.add_argument("config", help="YAML run config, e.g. configs/llama3-8b.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.tp=4")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    p.add_argument("--gpu", default="h100", help="accelerator: " + ", ".join(a.name for a in ACCELERATORS))
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: the accelerator's, 8)")
    p.add_argument("--network-gbps", type=float, default=None,
                   help="inter-node bandwidth per GPU, GB/s each way (default: the accelerator's, 50 on H100)")
    p.add_argument("--efficiency", type=float, default=EFFICIENCY,
                   help=f"achievable fraction of the dense peak for the model's GEMMs (default {EFFICIENCY})")
    p.add_argument("--budget-flops", type=float, default=None, help="compute budget in FLOPs for compute-optimal N, D")
    p.add_argument("--budget-gpu-hours", type=float, default=None,
                   help="compute budget in GPU-hours (FLOPs = hours × 3600 × peak × predicted MFU)")
    p.add_argument("--search", action="store_true", help="rank the layouts that fit by predicted throughput")
    p.add_argument("--top", type=int, default=10, help="layouts --search prints (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object (keys in kiln.plan.cli's docstring)")
    p.set_defaults(handler=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from kiln.config import load_config
    from kiln.errors import KilnConfigError
    from kiln.plan.dry_run import resolve_vocab_size
    from kiln.plan.planner import make_plan, scaling_for, search_layouts

    if args.budget_flops and args.budget_gpu_hours:
        raise KilnConfigError("give one budget: --budget-flops or --budget-gpu-hours")
    config = load_config(args.config, args.overrides)
    accel = accelerator(args.gpu, gpus_per_node=args.gpus_per_node, network_gbps=args.network_gbps)
    vocab = resolve_vocab_size(config.model, config.data)
    plan = make_plan(config, args.gpus, vocab, accel, efficiency=args.efficiency)
    budget = args.budget_flops
    if args.budget_gpu_hours:
        if plan.throughput is None:
            raise KilnConfigError(f"--budget-gpu-hours needs a throughput, and {accel.name} has no "
                                  f"{config.train.precision} tensor cores; give --budget-flops")
        budget = args.budget_gpu_hours * 3600 * accel.peak(config.train.precision) * plan.throughput.mfu
    scaling = scaling_for(config, vocab, budget)
    found = search_layouts(config, args.gpus, vocab, accel, efficiency=args.efficiency, limit=args.top) \
        if args.search else None
    report = plan_json(plan, accel, args.gpus, scaling, found)
    print(json.dumps(report, indent=1) if args.json else format_plan(report))
    return 0


def plan_json(plan, accel: Accelerator, gpus: int, scaling, found) -> dict:
    from kiln.plan.params import count_parameters, moe_routing

    model = plan.config.model
    params = count_parameters(model, plan.vocab_size, tp=plan.layout.tp)
    moe = None
    if model.moe.enabled:
        moe = {"num_experts": model.moe.num_experts, "top_k": model.moe.top_k,
               "shared_experts": model.moe.shared_experts, "expert_ffn_size": model.expert_ffn_size,
               "moe_layers": list(params.moe_layer_ids), "routing": moe_routing(model)}
    report = {
        "config": plan.config.name, "gpus": gpus,
        "gpu": {"name": accel.name, "memory_bytes": accel.memory_bytes, "bf16_tflops": accel.bf16_flops / 1e12,
                "fp8_tflops": accel.fp8_flops / 1e12 if accel.fp8_flops else None, "hbm_gbps": accel.hbm_gbps,
                "nvlink_gbps": accel.nvlink_gbps, "network_gbps": accel.network_gbps,
                "gpus_per_node": accel.gpus_per_node},
        "layout": plan.layout_json(),
        "moe": moe,
        "parameters": {"total": params.total, "active": params.active, "non_embedding": params.non_embedding,
                       "per_rank": params.per_rank(plan.layout),
                       "experts_per_rank": params.experts_per_rank(plan.layout)},
        "memory": plan.memory_json(),
        "throughput": plan.throughput.as_json() if plan.throughput else None,
        "scaling": scaling.as_json(),
    }
    if found is not None:
        report["search"] = [{"layout": p.layout_json(), "memory_total_bytes": p.memory.total,
                             "tokens_per_s": p.throughput.tokens_per_s, "mfu": p.throughput.mfu,
                             "step_time_s": p.throughput.step_time_s} for p in found]
    return report


def format_plan(r: dict) -> str:
    lay, mem, thr, sc, moe, params = r["layout"], r["memory"], r["throughput"], r["scaling"], r["moe"], r["parameters"]
    engine = lay["engine_description"] + (" + distributed optimizer" if lay["engine_settings"].get(
        "distributed_optimizer") else "")
    lines = [
        f"kiln plan: {r['config']} on {r['gpus']} × {r['gpu']['name']} ({r['gpu']['memory_bytes'] / GIB:.1f} GiB each)",
        f"  layout tp={lay['tp']} pp={lay['pp']} cp={lay['cp']} dp={lay['dp']}"
        + (f" virtual_pp={lay['virtual_pp']}" if lay["virtual_pp"] else "")
        + (f" ep={lay['ep']} expert_tp={lay['expert_tp']} expert_dp={lay['expert_dp']}" if moe else "")
        + f", {engine}, micro-batch {lay['micro_batch_size']}, recompute {lay['recompute']}"
        + (", sequence parallel" if lay["sequence_parallel"] else ""),
        f"  parameters {human(params['total'])}" + (" total" if moe else "")
        + f" (non-embedding {human(params['non_embedding'])})"
        + (f", {human(params['active'])} active per token: {moe['routing']}" if moe else ""),
        "",
        f"memory per GPU (pipeline stage {mem['stage']}, the fullest)",
    ]
    for name, n in mem["bytes"].items():
        note = mem["notes"].get(name)
        lines.append(f"  {name:<22} {human_bytes(n):>12}" + (f"   {note}" if note else ""))
    verdict = "fits" if mem["fits"] else f"DOES NOT FIT (biggest: {mem['biggest']})"
    lines.append(f"  {'total':<22} {human_bytes(mem['total_bytes']):>12}   of {human_bytes(mem['capacity_bytes'])}: {verdict}")
    lines.append("")
    if thr:
        b, a = thr["breakdown_s"], thr["assumptions"]
        lines += [
            "throughput (roofline)",
            f"  FLOPs per token {thr['flops_per_token']:.3g} (model), per step {thr['model_flops_per_step']:.3g} model, "
            f"{thr['hardware_flops_per_step']:.3g} with recomputation",
            f"  step {thr['step_time_s']:.3f} s = " + " + ".join(f"{k} {v:.3f}" for k, v in b.items() if v),
            f"  {thr['tokens_per_s']:,.0f} tokens/s ({thr['tokens_per_s_per_gpu']:,.0f} per GPU), MFU {thr['mfu']:.1%}",
            f"  assumptions: {a['efficiency']:.0%} of {a['peak_tflops']:.0f} TFLOP/s dense peak; NVLink "
            f"{a['nvlink_gbps']:g} GB/s, network {a['network_gbps']:g} GB/s per GPU each way, "
            f"{a['gpus_per_node']} GPUs per node; DP communication overlapped {a['dp_overlap']}; "
            f"pipeline bubble {a['pipeline_bubble']}"
            + (f"; expert dispatch {a['expert_dispatch']}" if "expert_dispatch" in a else ""),
            "",
        ]
    lines.append("compute-optimal (Hoffmann et al. 2022; losses are on the paper's data, for ranking only)")
    if moe:
        lines.append(f"  MoE: N is the {human(sc['parameters'])} active parameters per token (of "
                     f"{human(sc['moe_total_parameters'])}), which set the compute 6·N·D; the fits are for dense "
                     f"models, so the loss is a dense model's of that size, which an MoE usually beats")
    lines += [
        f"  this config trains {human(sc['tokens'])} tokens = {sc['tokens_per_parameter']:.1f} per parameter; "
        f"Chinchilla-optimal for {human(sc['parameters'])} parameters is {human(sc['chinchilla_optimal_tokens'])} "
        f"tokens; predicted loss {sc['predicted_loss']:.3f}",
        f"  for {sc['budget_flops'] or sc['training_flops']:.3g} FLOPs"
        + (" (the budget)" if sc["budget_flops"] else " (this config's 6·N·D)") + ":",
    ]
    lines += [f"    {o['method']:<36} {human(o['parameters'])} parameters, {human(o['tokens'])} tokens, "
              f"loss {o['predicted_loss']:.3f}" for o in sc["optimal"]]
    if "search" in r:
        lines += ["", f"layouts that fit, fastest first ({len(r['search'])} shown)"]
        for row in r["search"]:
            l = row["layout"]
            settings = l["engine_settings"]
            name = l["engine"] + (f"-z{settings['zero_stage']}" if "zero_stage" in settings else "") + (
                "+do" if settings.get("distributed_optimizer") else "")
            experts = f"ep={l['ep']} etp={l['expert_tp']} " if moe else ""
            lines.append(f"  tp={l['tp']} pp={l['pp']} cp={l['cp']} dp={l['dp']} {experts}{name:<14} "
                         f"mb={l['micro_batch_size']:<2} "
                         f"recompute={l['recompute']:<9} {human_bytes(row['memory_total_bytes']):>10}  "
                         f"{row['tokens_per_s']:>12,.0f} tok/s  MFU {row['mfu']:.1%}")
        if not r["search"]:
            lines.append("  none: use more GPUs or a smaller model")
    return "\n".join(lines)
