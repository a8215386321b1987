"""Compiled transformer layers (``kernels.compile: true``) against eager ones: step time and compile time.

kiln's model is built twice from the same seed on one process (CUDA, or megatron-core's CPU
emulation); one gets its layers compiled exactly as ``kernels.compile: true`` does
(kiln.kernels.compile). Both run forward + backward on the same batches, timed in rounds that
alternate which goes first, so machine load hits both equally; the ratio is eager / compiled from
the same run. The optimizer step is left out: compiling the layers does not change it.

The first compiled step is timed on its own: dynamo's trace of one layer plus inductor's forward and
backward compile, shared by every layer. Inductor caches compiled kernels on disk, which would
make a second run's compile look nearly free, so the bench compiles into a fresh cache directory
(``--warm-cache`` keeps the user's). On a machine shared with other work, run it with
``OMP_NUM_THREADS=1``: inductor's CPU kernels are OpenMP loops whose threads wait for each other,
and a loaded machine makes them wait for the scheduler (eager's small ops run on one thread).

On this project's 2-core CPU machine (``OMP_NUM_THREADS=1``, torch 2.15, cold cache): the first step
compiles in ~19 s (most of it inductor building its C++ kernels once per process; 2–5 s with a warm
cache), one graph for all layers; then forward + backward runs 1.10× eager's speed for tiny and
1.05× for small (matmuls, which compiling does not change, dominate a CPU step).

    python bench/compile.py                        # CPU: tiny (2 × 64) and small (4 × 256) models
    python bench/compile.py --models tiny --json compile.json
    python bench/compile.py --models gpu           # GPU: 12 × 768, seq 2048, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kiln.config import config_from_dict  # noqa: E402
from kiln.log import quiet_third_party, setup_logging  # noqa: E402

VOCAB = 4096
MODELS = {
    # configs/tiny.yaml's model and batch.
    "tiny": ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
             "model.seq_len=128", "train.micro_batch_size=4", "train.precision=fp32"],
    # bench/step_overhead.py's CPU preset: a step is compute, hundreds of ms on 2 cores.
    "small": ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.seq_len=256",
              "train.micro_batch_size=8", "train.precision=fp32"],
    "gpu": ["model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12", "model.seq_len=2048",
            "model.ffn_hidden_size=2048", "train.micro_batch_size=8", "train.precision=bf16"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_config(name: str, device: str):
    """One micro-batch per step on one process."""
    micro_batch = next(o.split("=")[1] for o in MODELS[name] if o.startswith("train.micro_batch_size="))
    return config_from_dict({"name": "bench"}, [*MODELS[name], f"train.global_batch_size={micro_batch}",
                                                f"model.vocab_size={VOCAB}", f"train.device={device}"])


def bench_model(name: str, ctx, args) -> dict:
    from kiln.kernels.compile import compile_layers
    from kiln.model.builder import build_model

    config = bench_config(name, ctx.device.type)
    mb, seq = config.train.micro_batch_size, config.model.seq_len
    eager = build_model(config.model, config.parallel, config.train, ctx, VOCAB)[0]
    compiled = build_model(config.model, config.parallel, config.train, ctx, VOCAB)[0]
    region = compile_layers([compiled])
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (mb, seq + 1), generator=generator).to(ctx.device) for _ in range(4)]
    positions = torch.arange(seq, device=ctx.device).unsqueeze(0).expand(mb, seq)

    def step(model, index: int) -> float:
        tokens = batches[index % len(batches)]
        model.zero_grad(set_to_none=True)
        loss = model(tokens[:, :-1], positions, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        return loss.item()

    def timed(model, steps: int) -> float:
        _sync(ctx.device)
        start = time.perf_counter()
        for index in range(steps):
            step(model, index)
        _sync(ctx.device)
        return (time.perf_counter() - start) / steps

    eager_first = timed(eager, 1)
    first = timed(compiled, 1)  # trace + compile, then the step itself
    loss_rel = abs(step(compiled, 0) - step(eager, 0)) / abs(step(eager, 0))
    for _ in range(args.warmup):
        step(eager, 0), step(compiled, 0)
    eager_times, compiled_times = [], []
    for round_index in range(args.rounds):
        order = [(eager_times, eager), (compiled_times, compiled)]
        for times, model in order if round_index % 2 == 0 else order[::-1]:
            times.append(timed(model, args.steps_per_round))
    eager_s, compiled_s = statistics.median(eager_times), statistics.median(compiled_times)
    # Each round's own ratio: steadier than the ratio of medians when the machine's load drifts.
    round_ratio = statistics.median(e / c for e, c in zip(eager_times, compiled_times))
    best_ratio = min(eager_times) / min(compiled_times)  # each at its least disturbed
    return {
        "num_layers": config.model.num_layers, "hidden_size": config.model.hidden_size, "seq_len": seq,
        "micro_batch_size": mb, "precision": config.train.precision, "vocab_size": VOCAB,
        "params": sum(p.numel() for p in eager.parameters()),
        "eager_step_s": eager_s, "compiled_step_s": compiled_s, "speedup_eager_over_compiled": eager_s / compiled_s,
        "speedup_median_of_rounds": round_ratio, "speedup_best_rounds": best_ratio,
        "eager_first_step_s": eager_first, "compiled_first_step_s": first, "compile_s": region.compile_seconds,
        "graphs": region.graphs, "fallback": region.fallback, "first_step_loss_rel_diff": loss_rel,
        "eager_step_s_rounds": eager_times, "compiled_step_s_rounds": compiled_times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        default=["gpu"] if torch.cuda.is_available() else ["tiny", "small"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--warm-cache", action="store_true", help="use inductor's existing on-disk cache")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-bench-inductor-")
    quiet_third_party()

    from kiln.parallel.backend import init_parallel

    first = bench_config(args.models[0], "auto")
    ctx = init_parallel(first.train.device, first.train.seed, first.layout)
    setup_logging(ctx.rank)
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU emulation"
    print(f"device {ctx.device.type} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"inductor cache {'warm (user)' if args.warm_cache else 'cold (fresh directory)'}")
    results = {}
    for name in args.models:
        r = results[name] = bench_model(name, ctx, args)
        print(f"{name:<6} {r['num_layers']} layers × {r['hidden_size']}, seq {r['seq_len']}, micro-batch "
              f"{r['micro_batch_size']}, {r['precision']}, {r['params'] / 1e6:.2f}M params")
        print(f"  step (fwd+bwd)  eager {r['eager_step_s'] * 1e3:8.1f} ms   compiled {r['compiled_step_s'] * 1e3:8.1f} ms"
              f"   eager/compiled {r['speedup_eager_over_compiled']:.2f}x (medians of {args.rounds} rounds; "
              f"per round {r['speedup_median_of_rounds']:.2f}x; best rounds {r['speedup_best_rounds']:.2f}x)")
        print(f"  first step      eager {r['eager_first_step_s']:8.2f} s    compiled {r['compiled_first_step_s']:8.2f} s"
              f"    compile {r['compile_s']:.1f} s, {r['graphs']} graph(s) for {r['num_layers']} layers"
              + (f"   FELL BACK: {r['fallback']}" if r["fallback"] else ""))
        print(f"  first-step loss, compiled vs eager: {r['first_step_loss_rel_diff']:.1e} relative")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": ctx.device.type, "device_name": device_name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "warm_cache": args.warm_cache, "rounds": args.rounds,
            "steps_per_round": args.steps_per_round, "models": results,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
