"""Step time of kiln's training loop against a plain PyTorch loop over the same model.

Both loops train the same megatron-core GPTModel (built by kiln, same weights, same device
backend: CUDA, or megatron-core's CPU emulation) on the same in-memory batches, so the ratio
isolates what kiln's loop adds: megatron-core DDP grad buffers, the pipeline schedule,
megatron-core's optimizer (grad-norm clipping, param groups) and the LR schedule. Timed steps
alternate between the two loops in rounds so drift in machine load hits both equally.

    python bench/step_overhead.py                       # CPU: a small model, 1 process
    python bench/step_overhead.py --preset gpu          # GPU: a ~125M model, also tokens/s and MFU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.config import config_from_dict  # noqa: E402
from kiln.log import quiet_third_party, setup_logging  # noqa: E402

PRESETS = {
    # Big enough that a step is compute (hundreds of ms on 2 cores), small enough for a laptop.
    "cpu": ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.seq_len=256",
            "train.micro_batch_size=8", "train.global_batch_size=8", "train.precision=fp32", "train.device=cpu"],
    "gpu": ["model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12", "model.seq_len=2048",
            "model.ffn_hidden_size=2048", "train.micro_batch_size=8", "train.global_batch_size=8",
            "train.precision=bf16", "train.device=cuda"],
}
VOCAB = 4096


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=4)
    args = parser.parse_args()
    quiet_third_party()

    from kiln.model.builder import build_model
    from kiln.parallel.backend import init_parallel
    from kiln.plan.flops import flops_per_token, peak_flops
    from kiln.train import build_run_engine
    from kiln.trainer.loop import Trainer

    config = config_from_dict({"name": "bench"}, [*PRESETS[args.preset], f"model.vocab_size={VOCAB}",
                                                  "optim.warmup_steps=0", "optim.schedule=constant",
                                                  "optim.grad_clip=0", "logging.wandb=disabled"])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    setup_logging(ctx.rank)
    device, mb, seq = ctx.device, config.train.micro_batch_size, config.model.seq_len
    generator = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, VOCAB, (mb, seq + 1), generator=generator)} for _ in range(16)]

    def cycle():
        while True:
            yield from batches

    # kiln's loop: exactly what `kiln train` runs per step.
    trainer = Trainer(train=config.train, data=config.data, seq_len=seq, ctx=ctx,
                      engine=build_run_engine(config, ctx, VOCAB), batches=cycle(), callbacks=[])

    def kiln_step() -> None:  # the body of Trainer.train's loop
        result = trainer.engine.forward_backward(trainer.next_micro_batches())
        trainer.engine.optimizer_step(result, skip=trainer.skip_requested(result))

    # Plain PyTorch: the same model class and weights, forward → backward → AdamW.
    plain = build_model(config.model, config.parallel, config.train, ctx, VOCAB)[0]
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=config.optim.lr, betas=(0.9, 0.95), weight_decay=0.1)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(mb, seq)
    plain_batches = cycle()

    def plain_step() -> None:
        tokens = next(plain_batches)["tokens"].to(device)
        plain_opt.zero_grad(set_to_none=True)
        loss = plain(tokens[:, :-1], positions, attention_mask=None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        plain_opt.step()

    def timed(step_fn) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps_per_round):
            step_fn()
        _sync(device)
        return (time.perf_counter() - start) / args.steps_per_round

    for _ in range(args.warmup):
        kiln_step()
        plain_step()
    kiln_times, plain_times = [], []
    for round_index in range(args.rounds):
        # Alternate which loop goes first, so neither always runs on a warmer cache.
        order = [(kiln_times, kiln_step), (plain_times, plain_step)]
        for times, step_fn in order if round_index % 2 == 0 else order[::-1]:
            times.append(timed(step_fn))
    kiln_s, plain_s = statistics.median(kiln_times), statistics.median(plain_times)
    tokens = mb * seq
    print(f"device {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU emulation, gloo'}), "
          f"preset {args.preset}: {config.model.num_layers} layers × {config.model.hidden_size}, seq {seq}, "
          f"micro-batch {mb}, {config.train.precision}")
    print(f"plain PyTorch loop : {plain_s * 1000:8.1f} ms/step  {tokens / plain_s:10,.0f} tok/s")
    print(f"kiln loop          : {kiln_s * 1000:8.1f} ms/step  {tokens / kiln_s:10,.0f} tok/s")
    print(f"ratio kiln / plain : {kiln_s / plain_s:.3f}   (target <= 1.05; median of {args.rounds} rounds)")
    peak = peak_flops(device)
    if peak:
        achieved = flops_per_token(config.model, VOCAB) * tokens / kiln_s
        print(f"kiln: {achieved / 1e12:.1f} TFLOP/s, MFU {achieved / peak * 100:.1f}% of {peak / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
