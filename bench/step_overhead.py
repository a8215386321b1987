"""Step time of kiln's training loop against a plain PyTorch loop over the same model.

Both loops train the same megatron-core GPTModel (built by kiln, same weights, same device
backend: CUDA, or megatron-core's CPU emulation) on the same in-memory batches, so the ratio
isolates what kiln's loop adds: megatron-core DDP grad buffers, the pipeline schedule,
megatron-core's optimizer (grad-norm clipping, param groups) and the LR schedule. Timed steps
alternate between the two loops in rounds so drift in machine load hits both equally.

In bf16 (or fp16) both loops keep fp32 master weights: kiln through megatron-core's mixed-precision
optimizer, the plain loop by stepping torch's AdamW on fp32 copies of its low-precision weights
(:class:`PlainAdamW`), so neither wins by skipping that work.

    python bench/step_overhead.py                       # CPU: a small model, 1 process
    python bench/step_overhead.py --preset gpu          # GPU: a ~125M model, also tokens/s and MFU
    python bench/step_overhead.py --preset 1b --json step.json   # configs/llama3-1b.yaml, bf16, 1 GPU
    python bench/step_overhead.py --preset 1b train.micro_batch_size=1   # dotted settings apply last
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

PRESETS = {
    # Big enough that a step is compute (hundreds of ms on 2 cores), small enough for a laptop.
    "cpu": ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.seq_len=256",
            "train.micro_batch_size=8", "train.global_batch_size=8", "train.precision=fp32", "train.device=cpu"],
    "gpu": ["model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12", "model.seq_len=2048",
            "model.ffn_hidden_size=2048", "train.micro_batch_size=8", "train.global_batch_size=8",
            "train.precision=bf16", "train.device=cuda"],
    # The shipped 1B config as a user runs it on one GPU (Llama-3.2-1B shape, vocab 128256,
    # seq 8192, micro-batch 2, bf16); only the settings below (BENCH_SETTINGS) differ.
    "1b": [],
}
# Presets that start from a shipped config file rather than kiln's defaults.
PRESET_CONFIG_FILES = {"1b": REPO / "configs" / "llama3-1b.yaml"}
# The plain loop has no LR schedule, no gradient clipping and no logger; turning them off in kiln
# too keeps the comparison on the loop itself. Dotted settings on the command line still win.
BENCH_SETTINGS = ["optim.warmup_steps=0", "optim.schedule=constant", "optim.grad_clip=0", "logging.wandb=disabled"]
VOCAB = 4096  # when the config names no vocabulary size (the cpu and gpu presets, tiny.yaml)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PlainAdamW:
    """torch.optim.AdamW as a plain PyTorch loop would use it, with fp32 master weights in bf16/fp16.

    The low-precision parameters stay the model's (compute) weights; AdamW updates fp32 copies from
    fp32 copies of the gradients and writes them back, as megatron-core's mixed-precision optimizer
    does for kiln. On a GPU it is torch's fused kernel, as in kiln's megatron engine (and as a
    plain-PyTorch user would pick it for speed).
    """

    def __init__(self, params, optim, device: torch.device) -> None:
        self.params = [p for p in params if p.requires_grad]
        low_precision = any(p.dtype != torch.float32 for p in self.params)
        self.masters = [p.detach().float() for p in self.params] if low_precision else None
        self.optimizer = torch.optim.AdamW(self.masters or self.params, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                           eps=optim.eps, weight_decay=optim.weight_decay,
                                           fused=True if device.type == "cuda" else None)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.masters is None:
            self.optimizer.step()
            return
        for master, param in zip(self.masters, self.params):
            master.grad = param.grad.float()
        self.optimizer.step()
        for master, param in zip(self.masters, self.params):
            param.copy_(master)


def bench_config(preset: str, config_file: str | None, overrides: list[str]):
    """The run config the bench trains: a preset (or a YAML file), the bench's settings, then the user's."""
    path = config_file or PRESET_CONFIG_FILES.get(preset)
    raw = read_yaml_mapping(path) if path else {"name": "bench"}
    raw.setdefault("name", Path(path).stem if path else "bench")
    config = config_from_dict(raw, [*([] if config_file else PRESETS[preset]), *BENCH_SETTINGS, *overrides])
    # One micro-batch per step on one process: the plain loop has no gradient accumulation, so
    # both loops do the same work per step whatever global batch the config was written for.
    config.train.global_batch_size = config.train.micro_batch_size
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", help="a YAML run config to train instead of the preset's model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("overrides", nargs="*", help="dotted settings applied last, e.g. train.micro_batch_size=1")
    args = parser.parse_args()
    quiet_third_party()

    from kiln.model.builder import build_model
    from kiln.parallel.backend import init_parallel
    from kiln.plan.flops import flops_per_token, peak_flops
    from kiln.train import build_run_engine
    from kiln.trainer.loop import Trainer

    config = bench_config(args.preset, args.config, args.overrides)
    vocab = config.model.vocab_size or VOCAB
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    setup_logging(ctx.rank)
    device, mb, seq = ctx.device, config.train.micro_batch_size, config.model.seq_len
    generator = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, vocab, (mb, seq + 1), generator=generator)} for _ in range(16)]

    def cycle():
        while True:
            yield from batches

    # kiln's loop: exactly what `kiln train` runs per step.
    trainer = Trainer(train=config.train, data=config.data, seq_len=seq, ctx=ctx,
                      engine=build_run_engine(config, ctx, vocab), batches=cycle(), callbacks=[])

    def kiln_step() -> None:  # the body of Trainer.train's loop
        trainer.train_step()

    # kiln's peak memory is read before the plain model exists, so it is kiln's alone; each peak
    # counts from after its model was built, so it is training's, not weight initialisation's.
    reset_peak_memory(device)
    for _ in range(args.warmup):
        kiln_step()
    memory = {"kiln": peak_memory(device)}
    held_by_kiln = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    # Plain PyTorch: the same model class and weights, forward → backward → AdamW.
    plain = build_model(config.model, config.parallel, config.train, ctx, vocab, fp8=config.fp8)[0]
    plain_opt = PlainAdamW(plain.parameters(), config.optim, device)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(mb, seq)
    plain_batches = cycle()
    reset_peak_memory(device)

    def plain_step() -> None:
        tokens = next(plain_batches)["tokens"].to(device)
        plain_opt.zero_grad()
        loss = plain(tokens[:, :-1], positions, attention_mask=None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        plain_opt.step()

    for _ in range(args.warmup):
        plain_step()
    # What the plain loop needs on top of kiln's resident state (weights, grads, optimizer).
    memory["plain"] = peak_memory(device, minus=held_by_kiln)

    def timed(step_fn) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps_per_round):
            step_fn()
        _sync(device)
        return (time.perf_counter() - start) / args.steps_per_round

    kiln_times, plain_times = [], []
    for round_index in range(args.rounds):
        # Alternate which loop goes first, so neither always runs on a warmer cache.
        order = [(kiln_times, kiln_step), (plain_times, plain_step)]
        for times, step_fn in order if round_index % 2 == 0 else order[::-1]:
            times.append(timed(step_fn))
    kiln_s, plain_s = statistics.median(kiln_times), statistics.median(plain_times)
    tokens = mb * seq
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU emulation, gloo"
    n_params = sum(p.numel() for p in plain.parameters())
    per_token = flops_per_token(config.model, vocab)
    peak = peak_flops(device, config.train.precision)
    print(f"device {device.type} ({device_name}), "
          f"{'config ' + args.config if args.config else 'preset ' + args.preset}: {config.model.num_layers} layers "
          f"× {config.model.hidden_size}, {n_params / 1e6:,.1f}M params, vocab {vocab}, seq {seq}, micro-batch {mb}, "
          f"{config.train.precision}")
    loops = {"plain": plain_s, "kiln": kiln_s}
    for name, step_s in loops.items():
        line = (f"{name + ' loop':<19}: {step_s * 1000:8.1f} ms/step  {tokens / step_s:10,.0f} tok/s  "
                f"{per_token * tokens / step_s / 1e12:7.2f} TFLOP/s")
        if peak:
            line += f"  MFU {per_token * tokens / step_s / peak:.1%}"
        if memory[name] is not None:
            line += f"  peak {memory[name]['allocated_gib']:.1f} GiB" + (" (over kiln's)" if name == "plain" else "")
        print(line)
    print(f"ratio kiln / plain : {kiln_s / plain_s:.3f}   (target <= 1.05; median of {args.rounds} rounds)")
    if device.type == "cuda" and not peak:
        print(f"MFU: the peak FLOP/s of {device_name} is not known to kiln.plan.flops")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device.type, "device_name": device_name, "world_size": ctx.layout.world_size,
            "preset": None if args.config else args.preset, "config": args.config, "overrides": args.overrides,
            "model": {"num_layers": config.model.num_layers, "hidden_size": config.model.hidden_size,
                      "seq_len": seq, "vocab_size": vocab, "params": n_params},
            "precision": config.train.precision, "micro_batch_size": mb, "tokens_per_step": tokens,
            "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "flops_per_token": per_token, "peak_flops": peak,
            "loops": {name: {"step_s": step_s, "step_s_rounds": times, "tokens_per_s": tokens / step_s,
                             "tflops_per_device": per_token * tokens / step_s / 1e12,
                             "mfu": per_token * tokens / step_s / peak if peak else None,
                             "peak_memory": memory[name]}
                      for (name, step_s), times in zip(loops.items(), (plain_times, kiln_times))},
            "ratio_kiln_plain": kiln_s / plain_s,
        }, indent=1) + "\n")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device, minus: int = 0) -> dict | None:
    """Peak CUDA memory since the last reset: allocated by tensors, less ``minus`` bytes that were
    already held; and reserved by the whole process's caching allocator. None on CPU, where torch
    keeps no such counter."""
    if device.type != "cuda":
        return None
    gib = 2**30
    return {"allocated_gib": (torch.cuda.max_memory_allocated(device) - minus) / gib,
            "process_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}


if __name__ == "__main__":
    main()
