"""Tokens/s of kiln's training step with FP8 GEMMs against the same step in bf16.

Both runs are kiln's own step (``engine.forward_backward`` + ``optimizer_step``, as `kiln train`
runs it) on the same model (the same config and seed, so the same weights) and the same
in-memory batches, built side by side in one process; timed steps alternate between them in
rounds so drift in machine load hits both equally. Only the transformer layers' GEMMs differ:
parameters, optimizer and everything else are bf16/fp32 in both. The number is the ratio of
tokens/s, FP8 over bf16: above 1, FP8's faster GEMMs pay for its casts.

    python bench/fp8.py --json fp8.json                          # configs/llama3-1b.yaml, torchao tensorwise
    python bench/fp8.py --backend te --recipe delayed            # Transformer Engine
    python bench/fp8.py train.micro_batch_size=1                 # dotted settings apply to both runs

torchao's casts run as separate kernels in eager mode; fused into the GEMMs' neighbours they
cost less (torchtitan compiles its float8 layers), so expect the ratio to depend on compilation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kiln.config import config_from_dict, read_yaml_mapping  # noqa: E402
from kiln.log import quiet_third_party, setup_logging  # noqa: E402

# As bench/step_overhead.py: no LR schedule, clipping or logger in the timed step.
BENCH_SETTINGS = ["optim.warmup_steps=0", "optim.schedule=constant", "optim.grad_clip=0", "logging.wandb=disabled"]
VOCAB = 4096  # when the config names no vocabulary size


def run_config(path: Path, overrides: list[str], precision: list[str]):
    raw = read_yaml_mapping(path)
    raw.setdefault("name", path.stem)
    config = config_from_dict(raw, [*BENCH_SETTINGS, *overrides, *precision])
    config.train.global_batch_size = config.train.micro_batch_size  # one micro-batch per step, one process
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "llama3-1b.yaml"))
    parser.add_argument("--backend", choices=["torchao", "te"], default="torchao")
    parser.add_argument("--recipe", default="tensorwise")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("overrides", nargs="*", help="dotted settings for both runs, e.g. train.micro_batch_size=1")
    args = parser.parse_args()
    quiet_third_party()

    from kiln.parallel.backend import init_parallel
    from kiln.train import build_run_engine
    from kiln.trainer.loop import Trainer

    fp8 = ["train.precision=fp8", f"fp8.backend={args.backend}", f"fp8.recipe={args.recipe}"]
    configs = {"bf16": run_config(Path(args.config), args.overrides, ["train.precision=bf16"]),
               "fp8": run_config(Path(args.config), args.overrides, fp8)}
    base = configs["bf16"]
    vocab = base.model.vocab_size or VOCAB
    ctx = init_parallel(base.train.device, base.train.seed, base.layout)
    setup_logging(ctx.rank)
    device, mb, seq = ctx.device, base.train.micro_batch_size, base.model.seq_len
    generator = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, vocab, (mb, seq + 1), generator=generator)} for _ in range(16)]

    def cycle():
        while True:
            yield from batches

    def step_function(config):
        trainer = Trainer(train=config.train, data=config.data, seq_len=seq, ctx=ctx,
                          engine=build_run_engine(config, ctx, vocab), batches=cycle(), callbacks=[])

        def step() -> None:  # the body of Trainer.train's loop
            trainer.train_step()
        return step

    steps = {name: step_function(config) for name, config in configs.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()

    def timed(step) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps_per_round):
            step()
        _sync(device)
        return (time.perf_counter() - start) / args.steps_per_round

    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps.items())
        for name, step in order if round_index % 2 == 0 else order[::-1]:
            times[name].append(timed(step))
    tokens = mb * seq
    step_s = {name: statistics.median(values) for name, values in times.items()}
    ratio = step_s["bf16"] / step_s["fp8"]  # = fp8 tokens/s over bf16 tokens/s
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU emulation, gloo"
    print(f"device {device.type} ({device_name}), {Path(args.config).name}: {base.model.num_layers} layers × "
          f"{base.model.hidden_size}, vocab {vocab}, seq {seq}, micro-batch {mb}; fp8 = {args.backend} {args.recipe}")
    for name, seconds in step_s.items():
        print(f"{name:<5}: {seconds * 1000:8.1f} ms/step  {tokens / seconds:10,.0f} tok/s")
    print(f"ratio fp8 / bf16 tokens/s: {ratio:.3f}   (median of {args.rounds} rounds)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device.type, "device_name": device_name, "config": args.config, "overrides": args.overrides,
            "backend": args.backend, "recipe": args.recipe,
            "model": {"num_layers": base.model.num_layers, "hidden_size": base.model.hidden_size, "seq_len": seq,
                      "vocab_size": vocab},
            "micro_batch_size": mb, "tokens_per_step": tokens, "rounds": args.rounds,
            "steps_per_round": args.steps_per_round,
            "precisions": {name: {"step_s": step_s[name], "step_s_rounds": times[name],
                                  "tokens_per_s": tokens / step_s[name]} for name in steps},
            "ratio_fp8_bf16": ratio,
        }, indent=1) + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
