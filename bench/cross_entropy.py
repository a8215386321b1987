"""Peak memory and time of the output layer + loss: kiln's chunked cross-entropy against megatron-core's.

Both variants run forward and backward of megatron-core's ColumnParallelLinear over a
Llama-3-sized vocabulary (128256) and the loss: the plain path as GPTModel runs it (the
layer's [tokens, vocab] logits, then ``vocab_parallel_cross_entropy``), the chunked one through
``kiln.kernels.cross_entropy`` (``kernels.cross_entropy=chunked``, the default). Each variant
runs in a process of its own, so one's freed memory cannot hide the other's peak; the peak is
the process's high-water RSS above its RSS once the layer and inputs exist. Variants alternate
in rounds; the reported ratios are chunked / plain from the same run.

    python bench/cross_entropy.py                          # CPU: 4096 tokens, hidden 256, fp32, chunks of 512
    python bench/cross_entropy.py --hidden 1024 --chunk 1024 --json ce.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("plain", "chunked")  # plain is the baseline


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """In this process: peak RSS growth and the median time of forward + backward (after one warm-up)."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from kiln.kernels.cross_entropy import output_layer_cross_entropy
    from kiln.log import quiet_third_party
    from kiln.parallel.backend import init_parallel
    from kiln.parallel.layout import ParallelLayout

    quiet_third_party()
    init_parallel("cpu", 0, lambda world: ParallelLayout(world_size=world, tp=1, pp=1, cp=1, dp=world))
    dtype = DTYPES[args.dtype]
    config = ModelParallelConfig(params_dtype=dtype, perform_initialization=False)
    layer = ColumnParallelLinear(args.hidden, args.vocab, config=config, init_method=torch.nn.init.zeros_,
                                 bias=False, gather_output=False)
    with torch.no_grad():
        layer.weight.normal_(std=0.02)
    batch = 1
    hidden = torch.randn(args.tokens, batch, args.hidden, dtype=dtype, requires_grad=True)  # [s, b, h]
    labels = torch.randint(0, args.vocab, (batch, args.tokens))

    def step(tokens: int) -> None:
        states, targets = hidden[:tokens], labels[:, :tokens]
        if variant == "plain":
            logits, _ = layer(states)
            loss = vocab_parallel_cross_entropy(logits, targets.t().contiguous())
            del logits  # GPTModel returns the loss only: the low-precision logits die before backward
        else:
            loss = output_layer_cross_entropy(layer, states, targets, chunk_tokens=args.chunk)
        loss.sum().backward()
        layer.weight.grad = hidden.grad = None

    step(16)  # warm-up: the kernels' one-time set-up, on too few tokens to move the peak
    before = _rss_bytes()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step(args.tokens)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_mb": (peak - before) / 2**20, "time_s": statistics.median(times)}


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--dtype", args.dtype, "--iters", str(args.iters)]
    out = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk", type=int, default=512, help="kernels.cross_entropy_chunk (default 512)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--iters", type=int, default=1, help="timed forward + backward per process (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each runs both variants once (default 1)")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the measuring child
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        for name in VARIANTS if round_index % 2 == 0 else reversed(VARIANTS):
            runs[name].append(run_variant(name, args))
            print(f"round {round_index + 1}: {name}: peak +{runs[name][-1]['peak_mb']:.0f} MB, "
                  f"{runs[name][-1]['time_s']:.2f} s", flush=True)
    result = {name: {key: statistics.median(r[key] for r in values) for key in ("peak_mb", "time_s")}
              for name, values in runs.items()}
    memory_ratio = result["chunked"]["peak_mb"] / result["plain"]["peak_mb"]
    time_ratio = result["chunked"]["time_s"] / result["plain"]["time_s"]
    print(f"\n{args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, chunks of {args.chunk} "
          f"tokens (median of {args.rounds} round(s))")
    for name, numbers in result.items():
        print(f"  {name:<8} peak +{numbers['peak_mb']:7.0f} MB  {numbers['time_s']:6.2f} s forward+backward")
    print(f"  chunked / plain: peak memory x{memory_ratio:.2f}, time x{time_ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "variant")},
            "variants": result, "memory_ratio": memory_ratio, "time_ratio": time_ratio}, indent=1) + "\n")


if __name__ == "__main__":
    main()
