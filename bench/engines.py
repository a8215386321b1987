"""Step time of every engine relative to the megatron engine, measured in the same run.

Every variant trains the same model on the same data and layout through the real CLI
(``kiln train --nproc-per-node N``): the megatron engine (megatron-core DDP + its optimizer)
is the baseline; then megatron with its distributed optimizer (megatron-core's ZeRO-1, the
like-for-like peer of ZeRO-1), ``parallel.engine=deepspeed`` at ZeRO stages 1, 2 and 3, and
``parallel.engine=fsdp`` (torch FSDP2) with and without resharding after forward. The step
time of a run is the median of its logged windows after the first (which holds start-up).
Variants run in rounds, in reversed order every other round, so drift in machine load hits
all alike.

    python bench/engines.py                      # CPU: 2 processes, a 4-layer 256-wide model
    python bench/engines.py --preset gpu --nproc 8
    python bench/engines.py --only megatron,fsdp  # a subset (the baseline always runs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {
    "cpu": ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.seq_len=128",
            "train.micro_batch_size=4", "train.precision=fp32", "train.device=cpu"],
    "gpu": ["model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12", "model.seq_len=2048",
            "model.ffn_hidden_size=2048", "train.micro_batch_size=8", "train.precision=bf16", "train.device=cuda"],
}
VARIANTS = {
    "megatron (baseline)": ["parallel.engine=megatron"],
    # megatron-core's own optimizer sharding (ZeRO-1 style): the like-for-like peer of ZeRO-1.
    "megatron distrib. optim.": ["parallel.engine=megatron", "optim.distributed_optimizer=true"],
    "deepspeed ZeRO-1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
    "deepspeed ZeRO-2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "deepspeed ZeRO-3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
    "fsdp": ["parallel.engine=fsdp"],
    "fsdp no reshard": ["parallel.engine=fsdp", "parallel.reshard_after_forward=false"],
}
BASELINE = "megatron (baseline)"


def step_time(overrides: list[str], nproc: int) -> float:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-engines-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "kiln", "train", "configs/tiny.yaml", "--nproc-per-node", str(nproc),
               f"train.run_dir={run_dir}", "checkpoint.every=0", "checkpoint.save_on_signal=false",
               "logging.wandb=disabled", *overrides]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(r["step_time_s"] for r in records[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated substrings of variant names to run")
    args = parser.parse_args()
    variants = {name: v for name, v in VARIANTS.items()
                if name == BASELINE or not args.only or any(w in name for w in args.only.split(","))}

    global_batch = 4 * args.nproc if args.preset == "cpu" else 8 * args.nproc
    common = [*PRESETS[args.preset], f"train.global_batch_size={global_batch}", f"train.max_steps={args.steps}",
              "train.log_every=5", "optim.warmup_steps=0"]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(step_time([*common, *variants[name]], args.nproc))
            print(f"round {round_index + 1}: {name}: {times[name][-1] * 1000:.1f} ms/step", flush=True)
    baseline = statistics.median(times[BASELINE])
    print(f"\n{args.preset} preset, {args.nproc} processes, global batch {global_batch}, {args.steps} steps, "
          f"{args.rounds} rounds (median of rounds)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<26} {median * 1000:8.1f} ms/step   x{median / baseline:.2f} of megatron")


if __name__ == "__main__":
    main()
