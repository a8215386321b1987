"""The engine interface: what the trainer, the checkpoint manager and the CLI may ask of an engine.

An engine owns everything between "here are this step's micro-batches" and "the weights
moved": wrapping the model parts (megatron-core DDP, DeepSpeed, torch FSDP2), the optimizer,
the LR schedule, forward/backward (pipeline schedules where there are pipelines), gradient
clipping, evaluation, its per-rank memory report, and its share of a checkpoint. Nothing
outside ``kiln/engine/`` asks which engine runs.

A step is three calls, so that callbacks can look at the loss and the gradient norm before the
weights move (the loss-spike guard skips the update there): :meth:`Engine.forward_backward`
accumulates this step's gradients and returns the loss; :meth:`Engine.measure_gradients` makes
them ready for the update and adds their global norm (engines that can only measure it inside
the update say so with ``grad_norm_before_update = False``); :meth:`Engine.optimizer_step`
applies them, or with ``skip=True`` drops them and leaves weights, optimizer state and LR
schedule untouched.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kiln.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from kiln.errors import KilnCheckpointError


@dataclass
class StepResult:
    """One optimizer step as this rank saw it."""

    loss: float | None
    """This rank's mean micro-batch loss; None where no loss is computed (pipeline stages before the last)."""
    grad_norm: float = float("nan")
    """Global gradient norm before clipping (the same on every rank); nan when the step was skipped."""
    skipped: bool = False
    """The update was not applied (asked by a callback, or an fp16 overflow)."""
    loss_scale: float | None = None
    """The dynamic loss scale, where the engine has one (fp16)."""
    compute_s: float | None = None
    """Seconds this rank worked on the step before its gradient reduction began, i.e. without waiting for
    slower peers (for the straggler metric); None where the engine cannot tell the two apart."""


@dataclass(frozen=True)
class SavedEngine:
    """What a checkpoint says about the engine that wrote it (read from its kiln.json)."""

    name: str
    checkpoint_format: str
    state: dict[str, Any]
    """The writing engine's :meth:`Engine.state_dict`."""
    step: int
    """The trainer step the checkpoint was taken at."""
    tensor_keys: frozenset[str] = frozenset()
    """The names of the tensors it holds (from its DCP metadata)."""


@dataclass(frozen=True)
class RankShare:
    """One rank's share of the model, as kiln.plan describes it to an engine sizing its state."""

    parameters: float
    """Parameters this rank holds, TP-sharded (on its pipeline stage)."""
    per_layer: float
    """Of which one transformer layer."""
    layers: int
    """Transformer layers on this rank."""
    dp: int
    cp: int
    param_bytes: int
    """Bytes of a weight in the training dtype."""
    half: bool
    """bf16/fp16/fp8 training: optimizers keep fp32 master weights."""
    device_type: str
    experts: float = 0.0
    """Of ``parameters``, the routed experts' (model.moe): megatron-core reduces their gradients and shards
    their optimizer state over expert_dp, not dp × cp."""
    expert_dp: int = 1

    @property
    def outside_layers(self) -> float:
        """The embedding, final norm and output layer on this rank."""
        return self.parameters - self.per_layer * self.layers


@dataclass(frozen=True)
class PlannedState:
    """An engine's bytes per rank for :class:`RankShare`, and its data-parallel traffic per step."""

    parameters: float
    gradients: float
    optimizer: float
    buffers: float
    """Alive through forward and backward: gathered parameters, communication buckets."""
    reduction_copy: float
    """Made by the gradient reduction after backward (gloo's reduce-scatter copies its input)."""
    gradient_traffic: float
    """Bytes each rank reduces over DP per step, before the ring's (dp − 1)/dp."""
    parameter_traffic: float
    """Bytes each rank all-gathers over DP per step (sharded parameters or optimizer)."""
    overlapped: bool
    """The reduction overlaps backward."""
    description: str
    expert_traffic: float = 0.0
    """Of gradient_traffic + parameter_traffic, the routed experts' bytes, which cross expert_dp (ring
    (expert_dp − 1)/expert_dp) instead of DP."""


class Engine(abc.ABC):
    """One rank's training engine. Subclasses register in :mod:`kiln.engine` by ``name``."""

    name: ClassVar[str]
    checkpoint_format: ClassVar[str]
    """Engines that write the same format load each other's checkpoints."""
    reads_formats: ClassVar[tuple[str, ...]] = ()
    """Other engines' formats this one can also load."""
    options_section: ClassVar[str | None] = None
    """A top-level run-config section of extra settings for this engine only (e.g. ``deepspeed:``)."""
    accumulates_main_grad: ClassVar[bool] = False
    """Gradients accumulate in megatron-core DDP's fp32 ``param.main_grad`` (which lets TE's GEMMs
    write weight gradients there directly: gradient-accumulation fusion)."""
    fp8_backends: ClassVar[tuple[str, ...]] = ("torchao",)
    """The fp8.backend choices it trains with (train.precision=fp8). Transformer Engine's FP8 needs
    megatron-core's schedules, which tell its layers when to re-cast their FP8 weights."""
    moe_support: ClassVar[str | None] = None
    """None when it trains mixture-of-experts models (model.moe, expert parallelism); else why not."""
    grad_norm_before_update: ClassVar[bool] = True
    """:meth:`measure_gradients` gives the global gradient norm before the update, so an update can
    be skipped on it; False where the norm is only known after :meth:`optimizer_step` (DeepSpeed)."""
    can_skip_update: ClassVar[bool] = True
    """:meth:`optimizer_step` can drop an update (``skip=True``) without touching the optimizer state."""
    lr_multiplier: float = 1.0
    """Scales the scheduled learning rate of the next updates (the loss-spike guard's cool-down)."""

    def __init__(self, *, model: ModelConfig, optim: OptimConfig, parallel: ParallelConfig, train: TrainConfig,
                 ctx) -> None:
        self.model_config, self.optim_config, self.parallel_config, self.train_config = model, optim, parallel, train
        self.ctx = ctx

    # -- configuration (class level: called before anything is built) --------------------
    @classmethod
    def validate(cls, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig) -> None:
        """Raise KilnConfigError for settings this engine cannot run, naming what to use instead."""

    @classmethod
    def check_environment(cls, parallel: ParallelConfig, train: TrainConfig, device_type: str) -> None:
        """Raise KilnEnvironmentError for what this machine cannot do with these settings."""

    @classmethod
    def hooks_inside_layers(cls, parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig) -> str | None:
        """Why this engine with these settings runs hooks inside the transformer layers (which compiled
        layers cannot trace: kernels.compile), naming the setting that avoids them; None when it does not."""
        return None

    @classmethod
    def describe(cls, parallel: ParallelConfig) -> str:
        """A few words for the dry run and the start-up log."""
        return cls.name

    # -- planning (class level: kiln.plan sizes a run before anything is built) ------------
    @classmethod
    @abc.abstractmethod
    def plan_state(cls, share: RankShare, parallel: ParallelConfig, optim: OptimConfig) -> PlannedState:
        """Bytes per rank of parameters, gradients, optimizer state and buffers, and DP traffic."""

    @classmethod
    def plan_settings(cls, parallel: ParallelConfig, optim: OptimConfig) -> dict[str, Any]:
        """The settings that change this engine's memory, for ``kiln plan --json``."""
        return {}

    @classmethod
    def plan_variants(cls) -> list[dict[str, Any]]:
        """Dotted overrides of each way to run this engine that ``kiln plan --search`` tries."""
        return [{"parallel.engine": cls.name}]

    @classmethod
    def memory_saving_changes(cls, parallel: ParallelConfig, optim: OptimConfig) -> list[dict[str, Any]]:
        """Dotted overrides that shrink this engine's state, for the memory check's advice."""
        return []

    # -- training ----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def model_parts(self) -> list[torch.nn.Module]:
        """The megatron-core model chunks this rank holds, unwrapped (for export and inspection)."""

    @abc.abstractmethod
    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """Accumulate the gradients of one global batch's share on this rank; returns its loss."""

    def measure_gradients(self, result: StepResult) -> StepResult:
        """Finish this step's gradients and set ``result.grad_norm`` to their global norm (the same on
        every rank); an fp16 overflow sets ``result.skipped``. The default measures nothing."""
        return result

    @abc.abstractmethod
    def optimizer_step(self, result: StepResult, *, skip: bool = False) -> StepResult:
        """Clip (by ``result.grad_norm``), step the optimizer and the LR schedule, zero the gradients;
        or drop them if ``skip``."""

    def advance_lr_schedule(self) -> None:
        """Step the LR schedule to this update's learning rate, scaled by :attr:`lr_multiplier`."""
        self.scheduler.step(increment=1)  # the LR of step k is schedule(k), in every engine
        if self.lr_multiplier != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.lr_multiplier

    @abc.abstractmethod
    def eval_losses(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
        """Forward-only mean loss of each micro-batch (empty where no loss is computed)."""

    @property
    def lr(self) -> float:
        """The learning rate of the step that was applied last (every engine's LR schedule drives
        the param groups of its ``optimizer``)."""
        return self.optimizer.param_groups[0]["lr"]

    @abc.abstractmethod
    def state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer states this rank holds (for the start-up report)."""

    # -- checkpoint state ----------------------------------------------------------------
    @abc.abstractmethod
    def sharded_state_dict(self, *, is_loading: bool, saved: SavedEngine | None = None) -> dict[str, Any]:
        """Model and optimizer as megatron-core sharded state (global keys; any layout loads it).

        When loading, ``saved`` describes the checkpoint, so the request can match what it holds.
        """

    @abc.abstractmethod
    def load_sharded_state_dict(self, loaded: dict[str, Any], saved: SavedEngine) -> None:
        """Put a loaded :meth:`sharded_state_dict` into the live model and optimizer."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able state kept in kiln.json: the LR schedule's position, the optimizer step."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    @classmethod
    def check_can_load(cls, saved_name: str, saved_format: str, where) -> None:
        """Refuse, naming why and what to do, a checkpoint whose state this engine cannot read."""
        if saved_format == cls.checkpoint_format or saved_format in cls.reads_formats:
            return
        from kiln.engine import engines_reading

        readers = engines_reading(saved_format)
        raise KilnCheckpointError(
            f"checkpoint {where} was saved by the {saved_name} engine, whose optimizer state is in the "
            f"'{saved_format}' format; the {cls.name} engine cannot read it. Resume with "
            + " or ".join(f"parallel.engine={name}" for name in readers)
            + " (or start from new weights with --no-resume and a new train.run_dir)")

    def close(self) -> None:
        """Release what the engine holds outside Python's reach (background threads, buffers)."""
