"""Predicted against measured peak memory per rank, for each engine (the README's table).

Each case trains a few steps through the real trainer (``kiln.train.run`` in torchrun workers)
and measures the peak of live tensor bytes per rank from before the model is built to the end:
``torch.cuda.max_memory_allocated`` on a GPU; on CPU, PyTorch's profiler's record of every CPU
allocation (its running total of live bytes; CPU has no caching allocator to ask). The
prediction is ``kiln plan``'s (kiln.plan.memory), without the GPU-only allocator slack and
CUDA context, which ``max_memory_allocated`` does not see either.

    python bench/memory.py                       # CPU: tiny and mid-size configs, every engine
    python bench/memory.py --only tiny --json runs/memory.json
    python bench/memory.py --only mid-moe --engines "megatron,megatron dist-opt"   # MoE, EP=2
    python bench/memory.py --device cuda --size 1b  # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "tiny": ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_len=128",
             "train.micro_batch_size=4", "train.global_batch_size=16"],
    # mid-size for a CPU: 8 layers, hidden 512 (~ 30M parameters with the bundled vocabulary)
    "mid": ["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8", "model.num_query_groups=4",
            "model.seq_len=256", "train.micro_batch_size=4", "train.global_batch_size=16"],
    # mid-size mixture of experts: 8 experts of width 512, top-2, split over 2 ranks (megatron engine only)
    "mid-moe": ["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8", "model.num_query_groups=4",
                "model.seq_len=256", "train.micro_batch_size=4", "train.global_batch_size=16",
                "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_ffn_hidden_size=512", "parallel.ep=2"],
    "1b": ["model.num_layers=16", "model.hidden_size=2048", "model.num_attention_heads=32", "model.num_query_groups=8",
           "model.seq_len=2048", "train.micro_batch_size=2", "train.global_batch_size=16"],
}
ENGINES = {
    "megatron": ["parallel.engine=megatron"],
    "megatron dist-opt": ["parallel.engine=megatron", "optim.distributed_optimizer=true"],
    "deepspeed ZeRO-1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
    "deepspeed ZeRO-2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "deepspeed ZeRO-3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
    "fsdp": ["parallel.engine=fsdp"],
}
QUIET = ["train.max_steps=3", "train.log_every=1", "checkpoint.every=0", "logging.wandb=disabled",
         "watchdog.timeout_s=0", "data.prefetch=0", "logging.progress=plain"]


def worker(args: argparse.Namespace) -> None:
    """One torchrun worker: train under a memory recorder, write this rank's peak."""
    import torch

    from kiln.config import load_config
    from kiln.train import run

    config = load_config(args.config, args.overrides)
    rank = int(os.environ["RANK"])
    if config.train.device == "cuda":
        run(config)
        peak = torch.cuda.max_memory_allocated()
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorder:
            run(config)
        peak = _profiled_peak(recorder)
    out = Path(config.train.run_dir) / f"memory_peak_rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "peak_bytes": peak}))


def _profiled_peak(recorder) -> int:
    """The most live bytes the CPU allocator held while recording (allocations made before don't count)."""
    from torch._C._profiler import _EventType

    peak, stack = 0, list(recorder.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


def measure(size: str, engine: str, device: str, nproc: int, extra: list[str]) -> dict:
    from kiln.config import load_config
    from kiln.plan.dry_run import resolve_vocab_size
    from kiln.plan.memory import estimate_memory

    overrides = [*SIZES[size], *ENGINES[engine], *QUIET, f"train.device={device}",
                 "train.precision=" + ("fp32" if device == "cpu" else "bf16"), *extra]
    with tempfile.TemporaryDirectory() as tmp:
        overrides.append(f"train.run_dir={tmp}/run")
        config = load_config(ROOT / "configs/tiny.yaml", overrides)
        layout = config.layout(nproc)
        predicted = estimate_memory(config, layout, resolve_vocab_size(config.model, config.data), device)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   __file__, "--worker", str(ROOT / "configs/tiny.yaml"), *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_SILENT="true")
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peaks = [json.loads(p.read_text())["peak_bytes"] for p in sorted(Path(tmp, "run").glob("memory_peak_rank*.json"))]
    items = dict(predicted.items)
    allocated = predicted.total - items.pop("allocator_and_context")  # what the measurement sees
    measured = max(peaks)
    return {"size": size, "engine": engine, "nproc": nproc, "device": device, "predicted_bytes": allocated,
            "measured_bytes": measured, "error": allocated / measured - 1, "items": items}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--only", default=None, help="sizes, comma-separated (tiny, mid, 1b)")
    parser.add_argument("--engines", default=None, help="engines, comma-separated names from ENGINES")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args, rest = parser.parse_known_args()
    if args.worker:
        args.config, args.overrides = rest[0], rest[1:]
        return worker(args)
    sizes = args.only.split(",") if args.only else (["tiny", "mid"] if args.device == "cpu" else ["1b"])
    engines = args.engines.split(",") if args.engines else list(ENGINES)
    rows = []
    print(f"{'size':<6} {'engine':<20} {'predicted':>11} {'measured':>11} {'error':>7}")
    for size in sizes:
        for engine in engines:
            row = measure(size, engine, args.device, args.nproc, rest)
            rows.append(row)
            print(f"{size:<6} {engine:<20} {row['predicted_bytes'] / 2**20:>8.1f} MiB {row['measured_bytes'] / 2**20:>8.1f} MiB "
                  f"{row['error']:>+7.1%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
