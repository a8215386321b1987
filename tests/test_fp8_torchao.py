"""fp8.backend=torchao on CPU: torchao's float8 GEMMs run here (torch._scaled_mm has CPU kernels), so
kiln's float8 linear layers train for real below the CLI, which itself refuses FP8 without a GPU.

Skipped where torchao is not installed (``pip install 'kiln[fp8]'``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                reason="torchao is not installed (pip install 'kiln[fp8]')")

STEPS = 4


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_matmul_is_close_to_bf16_and_gradients_flow(recipe):
    from kiln.kernels.float8_linear import Float8Matmul

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 64, generator=generator).bfloat16().requires_grad_()  # [s, b, in]
    w = (torch.randn(128, 64, generator=generator) * 0.05).bfloat16().requires_grad_()  # [out, in]
    y = Float8Matmul(recipe)(x, w)
    (y.float() ** 2).sum().backward()
    grads = x.grad, w.grad
    x.grad = w.grad = None
    reference = torch.nn.functional.linear(x, w)
    (reference.float() ** 2).sum().backward()
    assert y.dtype == torch.bfloat16 and y.shape == (32, 2, 128)
    # e4m3 keeps 3 mantissa bits: a few percent, far from bf16's 0.4 % but nowhere near noise.
    assert 1e-3 < _relative_error(y, reference) < 0.08
    assert _relative_error(grads[0], x.grad) < 0.1 and _relative_error(grads[1], w.grad) < 0.1


def _token_runs(steps: int, samples: int, length: int) -> list[torch.Tensor]:
    """Each step's samples: runs of consecutive token ids from random starts (a pattern a tiny model
    learns within a few steps, unlike uniform noise)."""
    generator = torch.Generator().manual_seed(7)
    starts = torch.randint(0, 256, (steps, samples, 1), generator=generator)
    return list((starts + torch.arange(length)) % 256)


def _train(rank: int, overrides: list[str]) -> dict:
    """STEPS steps of the tiny model through build_run_engine (as `kiln train` builds it); every layout
    sees the same global batches."""
    from kiln.config import config_from_dict
    from kiln.kernels.float8_linear import Float8ColumnParallelLinear, Float8RowParallelLinear
    from kiln.parallel.backend import destroy_parallel, init_parallel
    from kiln.train import build_run_engine
    from kiln.trainer.callbacks import Callback
    from kiln.trainer.loop import Trainer

    config = config_from_dict({}, ["model.vocab_size=256", "train.device=cpu", f"train.max_steps={STEPS}",
                                   "train.log_every=1", "train.micro_batch_size=2", "train.global_batch_size=4",
                                   "optim.warmup_steps=1", "optim.lr=3e-3", "logging.wandb=disabled", *overrides])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    per_rank, dp = config.train.global_batch_size // ctx.layout.dp, ctx.coords["dp"]
    batches = iter([{"tokens": step[dp * per_rank + first:dp * per_rank + first + 2]}
                    for step in _token_runs(STEPS, config.train.global_batch_size, config.model.seq_len + 1)
                    for first in range(0, per_rank, 2)])
    engine = build_run_engine(config, ctx, 256)
    losses = []

    class RecordLoss(Callback):
        def on_step_end(self, trainer, result):
            losses.append(trainer.global_loss(result))

    trainer = Trainer(train=config.train, data=config.data, seq_len=config.model.seq_len, ctx=ctx, engine=engine,
                      batches=batches, callbacks=[RecordLoss()])
    trainer.train()
    trainer.close()
    modules = [m for part in engine.model_parts for m in part.modules()]
    float8 = sum(isinstance(m, (Float8ColumnParallelLinear, Float8RowParallelLinear)) for m in modules)
    destroy_parallel()
    return {"losses": losses, "float8_layers": float8}


TORCHAO = ["train.precision=fp8", "fp8.backend=torchao"]


@pytest.fixture(scope="module")
def bf16_losses():
    (result,) = run_distributed(_train, 1, ["train.precision=bf16"])
    assert result["float8_layers"] == 0
    return result["losses"]


@pytest.mark.parametrize("world,overrides", [
    pytest.param(1, ["fp8.recipe=rowwise"], id="tp1-rowwise"),
    # TP's collectives around the GEMM, with and without sequence parallelism
    pytest.param(2, ["parallel.tp=2", "parallel.sequence_parallel=true"], id="tp2-sp"),
    pytest.param(2, ["parallel.tp=2", "optim.distributed_optimizer=true"], id="tp2-distopt",
                 marks=pytest.mark.extended),
    # the other engines (dp=2): torchao's GEMMs hold no state, so any engine runs them
    pytest.param(2, ["parallel.engine=fsdp"], id="fsdp-dp2", marks=pytest.mark.extended),
    pytest.param(2, ["parallel.engine=deepspeed", "parallel.zero_stage=3"], id="deepspeed-zero3-dp2",
                 marks=pytest.mark.extended),
])
def test_torchao_fp8_trains_close_to_bf16(world, overrides, bf16_losses):
    results = run_distributed(_train, world, [*TORCHAO, *overrides])
    for result in results:
        assert result["float8_layers"] == 4 * 2  # four GEMMs in each of tiny's two layers; not the output layer
        losses = result["losses"]
        assert len(losses) == STEPS and losses[-1] < losses[0]
        for step, (got, want) in enumerate(zip(losses, bf16_losses), start=1):
            assert abs(got - want) / want < 0.01, f"step {step}: fp8 loss {got:.4f} vs bf16 {want:.4f}"
    assert results[0]["losses"] == results[-1]["losses"]  # every rank reports the same global loss


def _checkpoint_keys(rank: int, precision: list[str]) -> dict:
    from kiln.config import config_from_dict
    from kiln.model.builder import build_model
    from kiln.parallel.backend import destroy_parallel, init_parallel

    config = config_from_dict({}, ["train.device=cpu", *precision])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)
    (model,) = build_model(config.model, config.parallel, config.train, ctx, 256, fp8=config.fp8)
    keys = {"state_dict": sorted(model.state_dict()), "sharded": sorted(model.sharded_state_dict()),
            "weights": {name: param.detach().float().sum().item() for name, param in model.named_parameters()}}
    destroy_parallel()
    return keys


def test_a_torchao_fp8_model_checkpoints_as_its_bf16_twin():
    """Dynamic scaling keeps no state: the same keys (and initial weights) as the bf16 model, so
    checkpoints cross between the two precisions."""
    (bf16,) = run_distributed(_checkpoint_keys, 1, ["train.precision=bf16"])
    (fp8,) = run_distributed(_checkpoint_keys, 1, TORCHAO)
    assert fp8 == bf16
