"""The fsdp engine: PyTorch FSDP2 (``fully_shard``) over megatron-core's tensor-parallel model.

Each transformer layer, then the root (embedding, final norm, output layer), becomes an FSDP
unit sharded over the data-parallel group (a DeviceMesh made from megatron-core's DP group,
so TP stays inside megatron-core's layers and FSDP never crosses it). Parameters are kept in
fp32 as DTensor shards (the master weights); ``MixedPrecisionPolicy`` gathers them in the
training dtype for compute and reduce-scatters gradients in fp32. ``parallel.offload_params=cpu``
keeps shards, gradients and the optimizer step in CPU memory (``CPUOffloadPolicy``);
``parallel.reshard_after_forward=false`` keeps gathered parameters from forward to backward.

The optimizer is torch AdamW over the shards, and the global gradient norm follows
megatron-core's rule: squares summed over the DP shards and over TP, with TP-replicated
parameters (norm gains) counted once. Checkpoints are per-parameter whole values
(:mod:`kiln.engine.portable_state`), so they load at another DP size, into the deepspeed
engine, and from the megatron engine's checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.config import OptimConfig, ParallelConfig, TrainConfig
from kiln.engine import portable_state
from kiln.engine.base import Engine, PlannedState, RankShare, SavedEngine, StepResult
from kiln.engine.flat_shards import FlatShare
from kiln.engine.forward import TokenBatches, mean_loss
from kiln.engine.schedule import build_lr_scheduler, load_scheduler_state, param_groups, scheduler_state
from kiln.errors import KilnCheckpointError, KilnConfigError
from kiln.parallel import collectives

_COMPUTE_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class FSDPEngine(Engine):
    name = "fsdp"
    moe_support = ("FSDP would all-gather every expert on every rank, and kiln's MoE layers' expert-parallel "
                   "gradient reduction lives in megatron-core DDP, which this engine replaces")
    checkpoint_format = "portable"
    reads_formats = ("megatron",)

    @classmethod
    def validate(cls, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise KilnConfigError(message)

        check(parallel.pp == 1 and parallel.virtual_pp in (None, 1),
              f"parallel.pp={parallel.pp}: the fsdp engine does not run pipeline parallelism (megatron-core's "
              "schedules finish gradients through its own DDP); use parallel.engine=megatron for pp > 1, or "
              "set parallel.pp=1 and let fsdp shard the model over data-parallel ranks instead")
        check(parallel.cp == 1,
              f"parallel.cp={parallel.cp} with parallel.engine=fsdp: kiln's FSDP mesh shards and reduces over "
              "data-parallel ranks only, and context-parallel ranks hold partial gradients of the same samples; "
              "use parallel.engine=megatron for context parallelism")
        check(not parallel.sequence_parallel,
              "parallel.sequence_parallel with parallel.engine=fsdp: the norm gradients it leaves partial over the "
              "TP group are reduced by megatron-core DDP, which fsdp replaces; set parallel.sequence_parallel=false "
              "(or use parallel.engine=megatron)")
        check(train.param_precision in _COMPUTE_DTYPE,
              f"train.precision={train.precision}: the fsdp engine trains in bf16, fp8 or fp32 (fp16 with loss "
              "scaling needs parallel.engine=deepspeed)")
        check(parallel.offload_optimizer == "none",
              "parallel.offload_optimizer with parallel.engine=fsdp: FSDP2 offloads parameters, gradients and the "
              "optimizer step together; set parallel.offload_params=cpu instead")
        check(parallel.offload_params in ("none", "cpu"),
              f"parallel.offload_params={parallel.offload_params}: the fsdp engine offloads to cpu only "
              "(NVMe offload needs parallel.engine=deepspeed with zero_stage=3)")
        check(not optim.distributed_optimizer,
              "optim.distributed_optimizer is megatron's ZeRO-1; fsdp already shards parameters, gradients and "
              "optimizer states: set optim.distributed_optimizer=false")

    @classmethod
    def plan_state(cls, share: RankShare, parallel: ParallelConfig, optim: OptimConfig) -> PlannedState:
        """fp32 shards (the master weights), their gradients and Adam's moments, all over dp. The root
        unit (embedding, final norm, output layer) stays gathered from forward to backward, and its
        unsharded gradient (in the weight dtype, reduced in fp32) exists at once; each layer is
        gathered while it runs (two at a time with prefetching), or every layer from forward to
        backward with reshard_after_forward=false. On CPU gloo reduce-scatters a copy of each unit's
        gradient, the root's the largest."""
        n, dp, pb, root = share.parameters, share.dp, share.param_bytes, share.outside_layers
        gathered_layers = share.layers if not parallel.reshard_after_forward else min(2, share.layers)
        buffers = (root + share.per_layer * gathered_layers) * pb + root * (pb + 4)
        sharded = n / dp if parallel.offload_params == "none" else 0.0
        copy = max(root, share.per_layer) * 4 if share.device_type == "cpu" and dp > 1 else 0.0
        return PlannedState(
            parameters=sharded * 4, gradients=sharded * 4, optimizer=sharded * 8, buffers=buffers,
            reduction_copy=copy, gradient_traffic=n * 4, parameter_traffic=2 * n * pb, overlapped=True,
            description=f"FSDP2 over dp = {dp}: fp32 shards, Adam moments sharded, units gathered in {pb} bytes")

    @classmethod
    def plan_settings(cls, parallel: ParallelConfig, optim: OptimConfig) -> dict[str, Any]:
        return {"reshard_after_forward": parallel.reshard_after_forward, "offload_params": parallel.offload_params}

    @classmethod
    def plan_variants(cls) -> list[dict[str, Any]]:
        return [{"parallel.engine": cls.name, "optim.distributed_optimizer": False}]

    @classmethod
    def memory_saving_changes(cls, parallel: ParallelConfig, optim: OptimConfig) -> list[dict[str, Any]]:
        return [] if parallel.reshard_after_forward else [{"parallel.reshard_after_forward": True}]

    @classmethod
    def describe(cls, parallel: ParallelConfig) -> str:
        extras = ["reshard after forward" if parallel.reshard_after_forward else "no reshard after forward"]
        if parallel.offload_params == "cpu":
            extras.append("cpu offload")
        return f"{cls.name} (FSDP2, {', '.join(extras)})"

    def __init__(self, model_parts: list[torch.nn.Module], **sections) -> None:
        super().__init__(**sections)
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        ctx, p = self.ctx, self.parallel_config
        (model,) = model_parts
        groups = ctx.pg_collection
        self.dp_group, self.tp_group = groups.dp, groups.tp
        # fp32 shards are the master weights; megatron-core built the model in the training dtype.
        model.float()
        self.checkpoint_template = portable_state.checkpoint_template(model)  # while parameters are whole
        # fully_shard replaces parameters with DTensors and drops megatron's attributes: note now
        # which ones TP splits (their norm squares are summed over TP; the others counted once).
        self._tp_split = {name: bool(getattr(param, "tensor_model_parallel", False))
                          for name, param in model.named_parameters()}
        mesh = DeviceMesh.from_group(self.dp_group, ctx.device.type, mesh_dim_names=("dp",))
        policy = dict(
            mesh=mesh,
            mp_policy=MixedPrecisionPolicy(param_dtype=_COMPUTE_DTYPE[self.train_config.param_precision],
                                           reduce_dtype=torch.float32),
            offload_policy=CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if p.offload_params == "cpu"
            else OffloadPolicy(),
            reshard_after_forward=p.reshard_after_forward,
        )
        units = [*model.decoder.layers, model]
        for unit in units:
            fully_shard(unit, **policy)
        if ctx.device.type != "cuda":
            for unit in units:  # gloo has no AVG reduction: sum, then divide by the DP size
                unit.set_force_sum_reduction_for_comms(True)
        self.module = model
        o = self.optim_config
        self.optimizer = torch.optim.AdamW(param_groups([model], o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                           eps=o.eps, weight_decay=o.weight_decay)
        self._init_adam_state()
        self.scheduler = build_lr_scheduler(o, self.train_config.max_steps, self.optimizer)
        self._batches = TokenBatches(self.model_config.seq_len, ctx)
        self.module.train()

    def _init_adam_state(self) -> None:
        """Adam's moments now (zeros, step 0: what its lazy init makes), so the start-up report
        measures them and a checkpoint loads into them before the first step."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if not self.optimizer.state[param]:
                    self.optimizer.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                                   "exp_avg_sq": torch.zeros_like(param)}

    @property
    def model_parts(self) -> list[torch.nn.Module]:
        return [self.module]

    # -- a step ---------------------------------------------------------------------------
    def _token_losses(self, batch) -> torch.Tensor:
        inputs, labels, positions, documents = self._batches.split(batch)
        return self.module(inputs, positions, attention_mask=documents, labels=labels)  # [b, s]

    def forward_backward(self, micro_batches) -> StepResult:
        losses = []
        for batch in micro_batches:
            loss = mean_loss(self._token_losses(batch))
            (loss / len(micro_batches)).backward()  # FSDP averages over DP ranks; this over micro-batches
            losses.append(loss.detach())
        return StepResult(loss=float(torch.stack(losses).mean()))

    def grad_norm(self) -> float:
        """megatron-core's global norm: squares over DP shards and TP, TP-replicated parameters once."""
        tp_rank = self.tp_group.rank()
        local = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for name, param in self.module.named_parameters():
            if param.grad is not None and (self._tp_split[name] or tp_rank == 0):
                local += _local(param.grad).detach().double().pow(2).sum()
        (over_dp,) = collectives.reduce_floats([float(local)], group=self.dp_group)
        (total,) = collectives.reduce_floats([over_dp], group=self.tp_group)
        return total ** 0.5

    def measure_gradients(self, result: StepResult) -> StepResult:
        result.grad_norm = self.grad_norm()
        return result

    def optimizer_step(self, result: StepResult, *, skip: bool = False) -> StepResult:
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            result.skipped = True
            return result
        norm = result.grad_norm
        clip = self.optim_config.grad_clip
        if clip > 0 and norm > 0:
            coeff = clip / (norm + 1e-6)  # megatron-core's clip coefficient
            if coeff < 1.0:
                with torch.no_grad():
                    for param in self.module.parameters():
                        if param.grad is not None:
                            param.grad.mul_(coeff)
        self.advance_lr_schedule()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def eval_losses(self, micro_batches) -> list[float]:
        self.module.eval()
        with torch.no_grad():
            losses = [float(mean_loss(self._token_losses(batch))) for batch in micro_batches]
        self.module.train()
        return losses

    def state_bytes(self) -> dict[str, int]:
        """Measured shards: parameters (fp32 masters) and Adam's moments; gradients by rule (this
        rank's fp32 shard of each, allocated during backward)."""
        params = list(self.module.parameters())
        param_bytes = sum(_local(p).numel() * _local(p).element_size() for p in params)
        moments = sum(_local(v).numel() * _local(v).element_size() for state in self.optimizer.state.values()
                      for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        grad_bytes = sum(_local(p).numel() * 4 for p in params)
        return {"parameters": param_bytes, "gradients": grad_bytes, "optimizer": moments}

    # -- checkpoint state -------------------------------------------------------------------
    def sharded_state_dict(self, *, is_loading: bool, saved: SavedEngine | None = None) -> dict[str, Any]:
        return portable_state.sharded_state(
            self.checkpoint_template, dict(self.module.named_parameters()), self._local_share,
            half=self.train_config.precision != "fp32", is_loading=is_loading, rank=self.ctx.rank,
            common={} if is_loading else {"adam_step": self._adam_step()}, request=portable_state.request_for(saved))

    def _local_share(self, key: str, param) -> FlatShare | None:
        """This rank's block of rows of a parameter (FSDP2 shards dim 0 in ``torch.chunk``
        pieces over the DP mesh): its fp32 values, which are the master weights, and moments."""
        from torch.distributed.tensor import Shard

        local, mesh = _local(param), param.device_mesh
        rows = param.shape[0]
        chunk = -(-rows // mesh.size())
        first = min(mesh.get_local_rank() * chunk, rows)
        if tuple(param.placements) != (Shard(0),) or local.shape[0] != min(chunk, rows - first):
            raise KilnCheckpointError(f"fsdp parameter {key}: placements {param.placements}, local shape "
                                      f"{tuple(local.shape)} are not the row blocks kiln checkpoints")
        if local.numel() == 0:
            return None
        state = self.optimizer.state[param]
        tensors = {"master": local.view(-1), **{name: _local(state[name]).view(-1) for name in portable_state.MOMENTS}}
        return FlatShare(first * local[0].numel(), tensors)

    def _adam_step(self) -> int:
        steps = {int(state["step"]) for state in self.optimizer.state.values() if "step" in state}
        return max(steps) if steps else 0

    @torch.no_grad()
    def load_sharded_state_dict(self, loaded: dict[str, Any], saved: SavedEngine) -> None:
        """The loaded rows are in this rank's shards already (no communication)."""
        portable_state.finish_load(loaded)
        adam_step = portable_state.loaded_common(loaded, saved.state, saved.step)["adam_step"]
        for state in self.optimizer.state.values():
            state["step"].fill_(adam_step)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": scheduler_state(self.scheduler), "adam_step": self._adam_step()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_scheduler_state(self.scheduler, state["scheduler"])


ENGINE = FSDPEngine
