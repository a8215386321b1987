"""Data loader throughput against what the trainer consumes, and the step time lost waiting for data.

Two measurements in the same run, on the same machine:

1. The loader alone: one rank reads micro-batches from the dataset (the bundled corpus by
   default, or ``--data DIR``) as fast as it can, with the run's micro-batch size and seq_len.
2. The trainer: ``kiln train`` on the config (tiny by default, 2 processes as ``make train``)
   through the real CLI and torchrun; its metrics.jsonl reports tokens/s and
   ``data_wait_frac``, the share of step time the slowest rank spent blocked in ``next()`` on
   its loader.

The trainer runs twice, with the config's read-ahead (``data.prefetch``) and with
``data.prefetch=0`` (every micro-batch read when the step asks for it) as the baseline.
The headroom ratio is the loader's samples/s over one rank's consumption (global batch / dp
per step); the trainer never starves while it is well above 1. The target for the tiny config
is a data-wait fraction under 2%.

    python bench/data.py                          # tiny config, 2 processes, 60 steps
    python bench/data.py --nproc 1 --steps 100 --data /path/to/mds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kiln.config import load_config  # noqa: E402


def loader_throughput(config, data: str | None, batches: int) -> dict[str, float]:
    """Samples/s of one rank reading the training stream on its own (world of one)."""
    from kiln.data.bundled import ensure_bundled_dataset
    from kiln.data.loader import build_train_loader

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    source = data or ensure_bundled_dataset(config.model.seq_len)
    loader = build_train_loader(source, micro_batch_size=config.train.micro_batch_size, seed=config.train.seed,
                                shuffle=config.data.shuffle, dp_rank=0, dp_size=1, replication=1,
                                num_workers=config.data.num_workers, global_batch_size=config.train.micro_batch_size)
    for _ in range(5):  # first batches open shards and build the shuffle
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    elapsed = time.perf_counter() - start
    samples = batches * config.train.micro_batch_size
    return {"samples_per_s": samples / elapsed, "tokens_per_s": samples * config.model.seq_len / elapsed}


def trainer_consumption(config_path: str, nproc: int, steps: int, data: str | None, extra: list[str]) -> list[dict]:
    """metrics.jsonl records of a real ``kiln train`` run (logged every 5 steps, no checkpoints)."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-data-") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [f"train.max_steps={steps}", "train.log_every=5", "checkpoint.every=0",
                     "checkpoint.save_on_signal=false", "logging.wandb=disabled", f"train.run_dir={run_dir}",
                     "optim.warmup_steps=0"]
        if data:
            overrides.append(f"data.path={data}")
        overrides += extra
        cmd = [sys.executable, "-m", "kiln", "train", config_path, "--nproc-per-node", str(nproc), *overrides]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] > 5]  # the first window holds start-up (shard open, warm-up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--loader-batches", type=int, default=2000)
    parser.add_argument("--data", default=None, help="an MDS dataset instead of the config's data")
    args = parser.parse_args()

    config = load_config(str(ROOT / args.config), [])
    dp = args.nproc  # the tiny config's layout: every process is a data-parallel replica
    runs = {f"prefetch {config.data.prefetch}": trainer_consumption(args.config, args.nproc, args.steps, args.data, []),
            "prefetch 0 (baseline)": trainer_consumption(args.config, args.nproc, args.steps, args.data,
                                                         ["data.prefetch=0"])}
    loader = loader_throughput(config, args.data or config.data.path, args.loader_batches)

    print(f"config {args.config}, {args.nproc} process(es), micro-batch {config.train.micro_batch_size}, "
          f"global batch {config.train.global_batch_size}, seq_len {config.model.seq_len}")
    print(f"loader alone (1 rank):       {loader['samples_per_s']:>10,.0f} samples/s  {loader['tokens_per_s']:>12,.0f} tokens/s")
    for name, records in runs.items():
        step_time = statistics.median(r["step_time_s"] for r in records)
        consumed_per_rank = config.train.global_batch_size / dp / step_time
        wait = [r["data_wait_frac"] for r in records]
        print(f"trainer, {name}:")
        print(f"  consumes (per rank):       {consumed_per_rank:>10,.0f} samples/s  "
              f"{consumed_per_rank * config.model.seq_len:>12,.0f} tokens/s  (median step {step_time * 1000:.1f} ms)")
        print(f"  headroom (loader/trainer): {loader['samples_per_s'] / consumed_per_rank:>10.1f}x")
        print(f"  data wait, share of step:  median {statistics.median(wait) * 100:.2f}%, max {max(wait) * 100:.2f}% "
              f"over {len(records)} logging windows (target < 2%)")

if __name__ == "__main__":
    main()
