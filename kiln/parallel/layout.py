"""The parallel layout: world = dp × pp × cp × tp, validated, with every rank's coordinates.

This module is pure Python (no process group is created here), so ``kiln train --dry-run``
can print the layout of a 512-GPU job on a laptop. Rank order is tp fastest, then cp, then
pp, then dp (megatron-core order ``tp-cp-ep-pp-dp``): TP groups stay inside a node, and a
data-parallel replica is a block of consecutive ranks, which is what the data loader's
``replication`` relies on.

Mixture-of-experts layers are laid out on the same ranks a second way (megatron-core's expert
groups): each pipeline stage's tp × cp × dp ranks become expert_tp × ep × expert_dp, expert_tp
fastest. Attention and the dense layers keep the first layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import ModelConfig, ParallelConfig, TrainConfig
from kiln.errors import KilnConfigError

MEGATRON_ORDER = "tp-cp-ep-pp-dp"
AXES = ("tp", "cp", "pp", "dp")


@dataclass(frozen=True, slots=True)
class ParallelLayout:
    """Sizes of each parallel axis and the rank arithmetic between them."""

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    virtual_pp: int | None = None
    ep: int = 1
    expert_tp: int = 0
    """0: the experts' TP group spans the dense tp × cp ranks (a dense model; no effect)."""

    def __post_init__(self) -> None:
        if not self.expert_tp:
            object.__setattr__(self, "expert_tp", self.tp * self.cp)

    @classmethod
    def build(cls, p: ParallelConfig, model: ModelConfig, train: TrainConfig, world_size: int) -> "ParallelLayout":
        """Build and validate the layout of these settings on ``world_size`` ranks."""
        layout = cls(
            world_size=world_size,
            tp=p.tp,
            pp=p.pp,
            cp=p.cp,
            dp=_derive_dp(p, world_size),
            virtual_pp=p.virtual_pp if p.virtual_pp and p.virtual_pp > 1 else None,
            ep=p.ep,
            expert_tp=p.expert_tp_size if model.moe.enabled else 0,
        )
        layout._validate_experts()
        layout._validate_model(model)
        layout._validate_batch(train)
        return layout

    # -- validation ---------------------------------------------------------------------
    def _validate_model(self, model: ModelConfig) -> None:
        tp = self.tp
        if model.num_attention_heads % tp:
            raise KilnConfigError(
                f"model.num_attention_heads({model.num_attention_heads}) is not divisible by parallel.tp({tp}): "
                f"{model.num_attention_heads} / {tp} = {model.num_attention_heads / tp:g} heads per rank"
            )
        if model.query_groups % tp:
            raise KilnConfigError(
                f"model.num_query_groups({model.query_groups}) is not divisible by parallel.tp({tp}): "
                f"{model.query_groups} / {tp} = {model.query_groups / tp:g} key/value heads per rank"
            )
        if model.ffn_size % tp:
            raise KilnConfigError(f"model ffn size({model.ffn_size}) is not divisible by parallel.tp({tp})")
        chunks = self.pp * (self.virtual_pp or 1)
        if model.num_layers % chunks:
            what = f"parallel.pp({self.pp})" + (f" × parallel.virtual_pp({self.virtual_pp})" if self.virtual_pp else "")
            raise KilnConfigError(
                f"model.num_layers({model.num_layers}) is not divisible by {what} = {chunks} pipeline chunks"
            )

    def _validate_experts(self) -> None:
        stage = self.tp * self.cp * self.dp
        experts = self.expert_tp * self.ep
        if stage % experts:
            raise KilnConfigError(
                f"parallel.expert_tp({self.expert_tp}) × parallel.ep({self.ep}) = {experts} does not divide the "
                f"{stage} ranks of a pipeline stage (tp({self.tp}) × cp({self.cp}) × dp({self.dp})), which the "
                f"experts are laid out on")
        if self.pp > 1 and experts != self.tp * self.cp:
            # megatron-core builds the expert groups in the dense rank order, and with pp before dp
            # (kiln's order, which keeps a replica's ranks consecutive) their pipeline groups only
            # match the dense ones when experts span exactly the tp × cp ranks.
            raise KilnConfigError(
                f"with parallel.pp({self.pp}) > 1, parallel.expert_tp({self.expert_tp}) × parallel.ep({self.ep}) "
                f"must equal tp({self.tp}) × cp({self.cp}) = {self.tp * self.cp}: kiln's rank order puts pp before "
                f"dp, so experts can only be split over a stage's tp × cp ranks; set parallel.expert_tp=1 and "
                f"parallel.ep={self.tp * self.cp}, or parallel.pp=1 (MoE layouts usually trade pp for ep)")

    @property
    def splits_experts(self) -> bool:
        """Whether experts are laid out differently from the dense layers (their groups are worth printing)."""
        return self.ep > 1 or self.expert_tp != self.tp * self.cp

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert weights: the stage's ranks over expert_tp × ep."""
        return self.tp * self.cp * self.dp // (self.expert_tp * self.ep)

    def _validate_batch(self, train: TrainConfig) -> None:
        per_step = train.micro_batch_size * self.dp
        if train.global_batch_size % per_step:
            raise KilnConfigError(
                f"train.global_batch_size({train.global_batch_size}) is not divisible by "
                f"train.micro_batch_size({train.micro_batch_size}) × dp({self.dp}) = {per_step}"
            )
        microbatches = train.global_batch_size // per_step
        if self.virtual_pp and microbatches % self.pp:
            raise KilnConfigError(
                f"interleaved pipelining needs the number of micro-batches per step "
                f"({train.global_batch_size} / ({train.micro_batch_size} × {self.dp}) = {microbatches}) "
                f"to be a multiple of parallel.pp({self.pp})"
            )

    # -- arithmetic ---------------------------------------------------------------------
    @property
    def replica_size(self) -> int:
        """Ranks in one data-parallel replica (they all see the same samples)."""
        return self.tp * self.cp * self.pp

    def num_microbatches(self, train: TrainConfig) -> int:
        return train.global_batch_size // (train.micro_batch_size * self.dp)

    def coords(self, rank: int) -> dict[str, int]:
        """The (tp, cp, pp, dp) coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tp, rest = rank % self.tp, rank // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        pp, dp = rest % self.pp, rest // self.pp
        return {"tp": tp, "cp": cp, "pp": pp, "dp": dp}

    def expert_coords(self, rank: int) -> dict[str, int]:
        """The (expert_tp, ep, expert_dp) coordinates of a global rank (pp is the dense one)."""
        stage_rank = rank % (self.tp * self.cp) + (rank // (self.tp * self.cp * self.pp)) * self.tp * self.cp
        etp, rest = stage_rank % self.expert_tp, stage_rank // self.expert_tp
        return {"expert_tp": etp, "ep": rest % self.ep, "expert_dp": rest // self.ep}

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ranks along ``axis`` ('tp', 'cp', 'pp', 'dp', or joined like 'tp-pp')."""
        # megatron-core's own rank arithmetic; imported here so validating a layout (the launcher,
        # before any process starts) does not load megatron-core.
        from megatron.core.parallel_state import RankGenerator

        generator = RankGenerator(tp=self.tp, ep=1, dp=self.dp, pp=self.pp, cp=self.cp, order=MEGATRON_ORDER)
        return generator.get_ranks(axis)

    def expert_groups(self, axis: str) -> list[list[int]]:
        """Every group of ranks along the expert layout's ``axis`` ('tp' for expert_tp, 'ep', 'dp' for
        expert_dp), as megatron-core builds them."""
        from megatron.core.parallel_state import RankGenerator

        generator = RankGenerator(tp=self.expert_tp, ep=self.ep, dp=self.expert_dp, pp=self.pp, cp=1,
                                  order=MEGATRON_ORDER)
        return generator.get_ranks(axis)

    def stage_layers(self, num_layers: int) -> list[list[tuple[int, int]]]:
        """Per pipeline rank, the [start, end) layer ranges of its model chunks.

        With interleaving, chunk v of rank r holds layers of virtual stage v × pp + r, so rank 0
        holds the first and the (pp+1)-th blocks of layers (megatron-core's assignment).
        """
        chunks = self.virtual_pp or 1
        per_chunk = num_layers // (self.pp * chunks)
        return [
            [((v * self.pp + r) * per_chunk, (v * self.pp + r + 1) * per_chunk) for v in range(chunks)]
            for r in range(self.pp)
        ]

    def describe(self, max_groups: int = 8) -> str:
        """Human-readable layout: sizes, then the rank groups of each axis."""
        vpp = f" (virtual {self.virtual_pp} chunks/rank)" if self.virtual_pp else ""
        lines = [
            f"world {self.world_size} = dp {self.dp} × pp {self.pp}{vpp} × cp {self.cp} × tp {self.tp}"
            f"   (rank order tp fastest, dp outermost)"
        ]
        for axis in AXES:
            groups = self.groups(axis)
            shown = "  ".join(_fmt_group(g) for g in groups[:max_groups])
            more = f"  … {len(groups) - max_groups} more" if len(groups) > max_groups else ""
            lines.append(f"  {axis} groups ({len(groups)} × {len(groups[0])} ranks): {shown}{more}")
        if self.splits_experts:
            lines.append(f"  experts: each stage's {self.tp * self.cp * self.dp} ranks = expert_dp {self.expert_dp} × "
                         f"ep {self.ep} × expert_tp {self.expert_tp}")
            for axis, name in (("ep", "ep"), ("tp", "expert_tp"), ("dp", "expert_dp")):
                groups = self.expert_groups(axis)
                shown = "  ".join(_fmt_group(g) for g in groups[:max_groups])
                more = f"  … {len(groups) - max_groups} more" if len(groups) > max_groups else ""
                lines.append(f"  {name} groups ({len(groups)} × {len(groups[0])} ranks): {shown}{more}")
        return "\n".join(lines)


def _fmt_group(ranks: list[int]) -> str:
    if len(ranks) > 2 and all(b - a == ranks[1] - ranks[0] for a, b in zip(ranks, ranks[1:])):
        step = ranks[1] - ranks[0]
        return f"[{ranks[0]}..{ranks[-1]}" + (f" step {step}]" if step != 1 else "]")
    return "[" + ",".join(map(str, ranks)) + "]"


def _derive_dp(p: ParallelConfig, world_size: int) -> int:
    if world_size < 1:
        raise KilnConfigError(f"world size must be >= 1, got {world_size}")
    model_parallel = p.model_parallel_size
    arithmetic = f"parallel: tp({p.tp}) × pp({p.pp}) × cp({p.cp}) = {model_parallel}"
    if world_size % model_parallel:
        raise KilnConfigError(f"{arithmetic} does not divide world size {world_size}")
    if p.dp is not None and p.dp * model_parallel != world_size:
        raise KilnConfigError(
            f"{arithmetic}, × dp({p.dp}) = {p.dp * model_parallel} does not equal world size {world_size} "
            f"(omit parallel.dp to derive it: {world_size // model_parallel})"
        )
    return world_size // model_parallel
