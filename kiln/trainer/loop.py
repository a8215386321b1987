"""The training loop: global batch → micro-batches → forward/backward (pipeline schedule) → step.

One optimizer step consumes ``global_batch_size`` samples: each data-parallel replica runs
``num_microbatches`` micro-batches of ``micro_batch_size`` through megatron-core's schedule
(no pipelining, 1F1B, or interleaved 1F1B, chosen from the layout), megatron-core DDP
averages the gradients over data-parallel ranks, and the optimizer clips and steps.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Any, Iterator

import torch
import torch.distributed as dist

from kiln.config import RunConfig
from kiln.parallel.backend import ParallelContext
from kiln.trainer.callbacks import Callback

log = logging.getLogger("kiln")


def _loss_func(output_tensor: torch.Tensor):
    """Mean next-token loss of one micro-batch; the schedule divides by the micro-batch count."""
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule scales `loss` in place


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        ctx: ParallelContext,
        models: list[torch.nn.Module],
        optimizer,
        scheduler,
        batches: Iterator[dict[str, torch.Tensor]],
        callbacks: list[Callback],
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        checkpointer=None,
        preemption=None,
        wandb_run_id: str | None = None,
        val_batches: list[dict[str, torch.Tensor]] | None = None,
        deepspeed=None,
    ) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.config, self.ctx, self.models = config, ctx, models
        self.optimizer, self.scheduler = optimizer, scheduler
        self.batches, self.callbacks = batches, callbacks
        self.num_microbatches = ctx.layout.num_microbatches(config.train)
        self.tokens_per_step = config.train.global_batch_size * config.model.seq_len
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.forward_backward = get_forward_backward_func(
            pp_size=ctx.layout.pp, vp_size=ctx.layout.virtual_pp
        )
        self.checkpointer, self.preemption, self.wandb_run_id = checkpointer, preemption, wandb_run_id
        self.val_batches = val_batches
        self.deepspeed = deepspeed  # a kiln.parallel.deepspeed_engine.DeepSpeedEngine, or None: megatron
        self.step = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self._positions = torch.arange(config.model.seq_len, device=ctx.device).unsqueeze(0)
        self._data_wait_s = 0.0  # time blocked on the data loader since the last logged step
        self._loader_started = False

    # -- one step ----------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        tokens = next(data_iterator)["tokens"].to(self.ctx.device, non_blocking=True)  # [b, s+1]
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # [b, s]
        positions = self._positions.expand_as(inputs)
        output = model(inputs, positions, attention_mask=None, labels=labels)  # last stage: loss [b, s]
        return output, _loss_func

    def _token_losses(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token losses [b, s] of one micro-batch (the deepspeed engine's forward)."""
        output, _ = self._forward_step(iter([batch]), model)
        return output

    def train_step(self) -> tuple[torch.Tensor, float]:
        """Run one optimizer step; returns (this rank's summed micro-batch losses and count, grad norm)."""
        # Every model chunk walks the same micro-batches (interleaved pipelines visit them
        # once per chunk), and every rank draws them so all iterators stay in step.
        wait_start = time.perf_counter()
        microbatches = [next(self.batches) for _ in range(self.num_microbatches)]
        self._count_data_wait(time.perf_counter() - wait_start)
        if self.deepspeed is not None:
            return self.deepspeed.train_step(microbatches, self._token_losses, self.scheduler)
        for model in self.models:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(microbatches) for _ in self.models]
        losses = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.models if len(self.models) > 1 else self.models[0],
            num_microbatches=self.num_microbatches,
            seq_length=self.config.model.seq_len,
            micro_batch_size=self.config.train.micro_batch_size,
            decoder_seq_length=self.config.model.seq_len,
            forward_only=False,
        )
        self.scheduler.step(increment=1)  # the LR of step k is schedule(k)
        _, grad_norm, _ = self.optimizer.step()
        loss_stats = torch.zeros(2, dtype=torch.float64)
        if losses:  # only the last pipeline stage computes the loss
            loss_stats[0] = sum(float(d["lm loss"]) for d in losses) / len(losses)
            loss_stats[1] = 1.0
        return loss_stats, float(grad_norm) if grad_norm is not None else float("nan")

    def evaluate(self) -> dict[str, float]:
        """Mean loss over the validation micro-batches (forward only, the same schedule)."""
        if self.deepspeed is not None:
            losses = self.deepspeed.eval_losses(self.val_batches, self._token_losses)
        else:
            losses = self._megatron_eval_losses()
        stats = torch.zeros(2, dtype=torch.float64)
        if losses:  # with pipelines, only the last stage has them
            stats[0] = sum(losses) / len(losses)
            stats[1] = 1.0
        dist.all_reduce(stats)
        loss = float(stats[0] / stats[1])
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def _megatron_eval_losses(self) -> list[float]:
        for model in self.models:
            model.eval()
        with torch.no_grad():
            losses = self.forward_backward(
                forward_step_func=self._forward_step,
                data_iterator=[iter(self.val_batches) for _ in self.models] if len(self.models) > 1
                else iter(self.val_batches),
                model=self.models if len(self.models) > 1 else self.models[0],
                num_microbatches=len(self.val_batches),
                seq_length=self.config.model.seq_len,
                micro_batch_size=self.config.train.micro_batch_size,
                decoder_seq_length=self.config.model.seq_len,
                forward_only=True,
            )
        for model in self.models:
            model.train()
        return [float(d["lm loss"]) for d in losses]

    def _evaluation_due(self) -> bool:
        if self.val_batches is None:
            return False
        every = self.config.data.val.every
        return self.step == self.config.train.max_steps or bool(every and self.step % every == 0)

    # -- the loop ----------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Train to ``train.max_steps``; raises TrainingPreempted after a stop signal's save."""
        cfg = self.config.train
        for model in self.models:
            model.train()
        history: list[dict[str, Any]] = []
        window_start, window_steps = time.perf_counter(), 0
        while self.step < cfg.max_steps:
            loss_stats, grad_norm = self.train_step()
            self.step += 1
            self.consumed_samples += cfg.global_batch_size
            self.consumed_tokens += self.tokens_per_step
            window_steps += 1
            evaluate = self._evaluation_due()
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or evaluate:
                if self.ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                window_s = time.perf_counter() - window_start
                step_time = window_s / window_steps
                data_wait = self._data_wait_fraction(window_s)
                # Every last-stage rank holds the same (tp, cp) loss for its replica: summing the
                # pairs over the world and dividing averages over data-parallel replicas.
                dist.all_reduce(loss_stats)
                metrics = self._metrics(float(loss_stats[0] / loss_stats[1]), grad_norm, step_time)
                metrics["data_wait_frac"] = data_wait
                if evaluate:
                    metrics.update(self.evaluate())
                history.append(metrics)
                if self.ctx.rank == 0:
                    for callback in self.callbacks:
                        callback.on_log(metrics)
                window_start, window_steps = time.perf_counter(), 0
                if self.preemption is not None:
                    self.preemption.step_time_s = step_time
            self._checkpoint_after_step()
        if self.checkpointer is not None:
            self.checkpointer.wait()
        return history

    def _count_data_wait(self, waited_s: float) -> None:
        """The first fetch of a process is the loader's one-time start (epoch shuffle, first
        shards): logged once, kept out of the steady-state data-wait metric."""
        if self._loader_started:
            self._data_wait_s += waited_s
            return
        self._loader_started = True
        if self.ctx.rank == 0:
            log.info(f"data loader: first micro-batches after {waited_s:.2f}s")

    def _data_wait_fraction(self, window_s: float) -> float:
        """Share of the logging window the slowest rank spent blocked on its data loader."""
        wait = torch.tensor([self._data_wait_s / max(window_s, 1e-9)], dtype=torch.float64)
        dist.all_reduce(wait, op=dist.ReduceOp.MAX)
        self._data_wait_s = 0.0
        return float(wait[0])

    def _checkpoint_after_step(self) -> None:
        every, last = self.config.checkpoint.every, self.step == self.config.train.max_steps
        signum = self.preemption.requested() if self.preemption is not None else None
        if self.checkpointer is None:
            return
        self.checkpointer.poll()
        if signum is not None or (every and (self.step % every == 0 or last)):
            # The last step's and a preemption's save block: the process is about to exit.
            self.checkpointer.save(self, self.wandb_run_id, blocking=signum is not None or last)
        if signum is not None:
            from kiln.trainer.preemption import TrainingPreempted

            raise TrainingPreempted(self.step, signum)

    def _metrics(self, loss: float, grad_norm: float, step_time: float) -> dict[str, Any]:
        tokens_per_s = self.tokens_per_step / step_time
        metrics: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time,
            "tokens": self.consumed_tokens,
        }
        if self.flops_per_token:
            tflops_per_gpu = self.flops_per_token * tokens_per_s / self.ctx.layout.world_size
            metrics["tflops_per_gpu"] = tflops_per_gpu / 1e12
            if self.peak_flops:
                metrics["mfu"] = tflops_per_gpu / self.peak_flops
        loss_scale = self.deepspeed.loss_scale() if self.deepspeed is not None else None
        if loss_scale is not None:
            metrics["loss_scale"] = loss_scale
        if self.ctx.device.type == "cuda":
            metrics["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    def close(self) -> None:
        for callback in self.callbacks:
            callback.close()
