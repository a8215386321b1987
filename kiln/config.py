"""The typed run config: YAML loading, dotted command-line overrides, validation.

A run is one YAML file in ``configs/``. Every section is a dataclass that validates itself in
``__post_init__``; checks that need two sections live in :class:`RunConfig`, and checks that
need the world size live in :mod:`kiln.parallel.layout`. An unknown key is an error that names
the key and the nearest valid one, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kiln.errors import KilnConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KilnConfigError(message)


@dataclass(kw_only=True, slots=True)
class MoeConfig:
    """Mixture-of-experts feed-forward layers (megatron-core's MoE layer); off while num_experts is 0.

    Each MoE layer routes every token to ``top_k`` of ``num_experts`` SwiGLU experts (plus the
    shared experts every token passes through); experts are split over parallel.ep ranks.
    """

    num_experts: int = 0
    """Routed experts per MoE layer; 0 keeps every layer dense."""
    top_k: int = 2
    """Experts each token is routed to."""
    expert_ffn_hidden_size: int | None = None
    """SwiGLU inner width of one expert; None takes the dense one (model.ffn_hidden_size's rule)."""
    shared_experts: int = 0
    """Experts every token passes through besides its routed ones (DeepSeek-style), each expert-sized."""
    layer_freq: int = 1
    """Every layer is an MoE layer (1), or every N-th one, starting with the first; the rest stay dense."""
    load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """Auxiliary load-balancing loss over each micro-batch's tokens (aux_loss, Switch Transformer),
    over each sequence's (seq_aux_loss, DeepSeek-V2), or none."""
    aux_loss_coeff: float = 1e-2
    """Weight of the load-balancing loss (0 turns it off)."""
    expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert routing bias, raised for underloaded experts and
    lowered for overloaded ones after every step; needs score_function=sigmoid."""
    expert_bias_update_rate: float = 1e-3
    """How far the expert bias moves per step."""
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over experts (Mixtral), or per-expert sigmoid (DeepSeek-V3)."""
    z_loss_coeff: float = 0.0
    """Router z-loss weight (ST-MoE), which keeps the router logits small; 0 turns it off."""
    capacity_factor: float | None = None
    """None: dropless (every routed token is computed). A number: each expert takes at most
    capacity_factor × tokens × top_k / num_experts tokens per micro-batch and the rest are dropped."""
    drop_policy: Literal["probs", "position"] = "probs"
    """With a capacity factor: drop an expert's lowest-probability tokens, or its last ones."""
    router_fp32: bool = True
    """Compute the router (its logits, softmax and top-k) in fp32 whatever the training precision."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach their experts' ranks: all-to-all (scales with parallel.ep), or all-gather
    (every rank sees every token; simple, for small ep)."""
    grouped_gemm: bool = True
    """Run a rank's experts as one grouped GEMM where Transformer Engine offers it (GPUs); otherwise,
    and on CPU, one GEMM per expert in a loop."""

    def __post_init__(self) -> None:
        _check(self.num_experts >= 0, f"model.moe.num_experts must be >= 0 (0: dense), got {self.num_experts}")
        if not self.enabled:
            return
        _check(1 <= self.top_k <= self.num_experts,
               f"model.moe.top_k({self.top_k}) must be between 1 and model.moe.num_experts({self.num_experts})")
        _check(self.expert_ffn_hidden_size is None or self.expert_ffn_hidden_size > 0,
               f"model.moe.expert_ffn_hidden_size must be positive, got {self.expert_ffn_hidden_size}")
        _check(self.shared_experts >= 0, f"model.moe.shared_experts must be >= 0, got {self.shared_experts}")
        _check(self.layer_freq >= 1, f"model.moe.layer_freq must be >= 1 (1: every layer), got {self.layer_freq}")
        _check(self.aux_loss_coeff >= 0, f"model.moe.aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")
        _check(self.z_loss_coeff >= 0, f"model.moe.z_loss_coeff must be >= 0, got {self.z_loss_coeff}")
        _check(self.expert_bias_update_rate > 0,
               f"model.moe.expert_bias_update_rate must be positive, got {self.expert_bias_update_rate}")
        _check(self.capacity_factor is None or self.capacity_factor > 0,
               f"model.moe.capacity_factor must be positive (or null for dropless), got {self.capacity_factor}")
        _check(not self.expert_bias or self.score_function == "sigmoid",
               "model.moe.expert_bias (aux-loss-free balancing) adds the bias to sigmoid scores: set "
               "model.moe.score_function=sigmoid")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def uses_aux_loss(self) -> bool:
        """Whether a load-balancing loss is trained (a type other than none, with a positive weight)."""
        return self.load_balancing != "none" and self.aux_loss_coeff > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether the global layer ``layer`` (0-based) is an MoE layer."""
        return self.enabled and layer % self.layer_freq == 0

    def moe_layers(self, num_layers: int) -> list[int]:
        return [layer for layer in range(num_layers) if self.is_moe_layer(layer)]


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention); None means one per query head."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; None takes Llama's rule: 8/3 × hidden, rounded up to a multiple of 256."""
    vocab_size: int | None = None
    """Vocabulary size; None takes the tokenizer's. Padded up for TP (see make_vocab_divisible_by)."""
    make_vocab_divisible_by: int = 128
    """The embedding table is padded to a multiple of this × tp, as Megatron does."""
    seq_len: int = 128
    """Training sequence length (tokens per sample)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    moe: MoeConfig = field(default_factory=MoeConfig)
    """Mixture of experts (off by default)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_len", "make_vocab_divisible_by"):
            _check(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            f"model.hidden_size({self.hidden_size}) is not divisible by "
            f"model.num_attention_heads({self.num_attention_heads}): "
            f"{self.hidden_size} / {self.num_attention_heads} = {self.hidden_size / self.num_attention_heads:g}",
        )
        groups = self.query_groups
        _check(
            groups > 0 and self.num_attention_heads % groups == 0,
            f"model.num_attention_heads({self.num_attention_heads}) is not divisible by "
            f"model.num_query_groups({groups})",
        )
        _check(self.head_dim % 2 == 0, f"RoPE needs an even head dimension, got hidden/heads = {self.head_dim}")
        if self.vocab_size is not None:
            _check(self.vocab_size > 0, f"model.vocab_size must be positive, got {self.vocab_size}")
        if self.ffn_hidden_size is not None:
            _check(self.ffn_hidden_size > 0, f"model.ffn_hidden_size must be positive, got {self.ffn_hidden_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return -(-int(8 * self.hidden_size / 3) // 256) * 256

    @property
    def expert_ffn_size(self) -> int:
        """SwiGLU inner width of one MoE expert."""
        return self.moe.expert_ffn_hidden_size or self.ffn_size


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the world is split: world = dp × pp × cp × tp (tp innermost, dp outermost)."""

    tp: int = 1
    """Tensor-parallel size (megatron-core column/row-parallel layers)."""
    pp: int = 1
    """Pipeline-parallel stages."""
    dp: int | None = None
    """Data-parallel size; None derives it: world / (tp × pp × cp)."""
    cp: int = 1
    """Context-parallel size (the sequence split over ranks inside attention)."""
    virtual_pp: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); None for plain 1F1B."""
    ep: int = 1
    """Expert-parallel size (model.moe): each MoE layer's experts are split over ep ranks, carved out of
    the tp × cp × dp ranks of a pipeline stage (the dense layers keep their layout)."""
    expert_tp: int | None = None
    """Tensor-parallel size inside each expert; None takes parallel.tp. Fine-grained experts often run
    best with expert_tp=1 and a larger ep."""
    sequence_parallel: bool = False
    """Shard norm and dropout activations over the TP group (needs tp > 1)."""
    engine: str = "megatron"
    """The training engine (kiln.engine.ENGINES): megatron (megatron-core DDP, optimizer and pipeline
    schedules), deepspeed (DeepSpeed ZeRO over megatron-core's tensor-parallel layers) or fsdp
    (torch FSDP2 over megatron-core's tensor-parallel layers)."""
    zero_stage: int = 1
    """engine=deepspeed: ZeRO stage; 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """engine=deepspeed: keep optimizer states (and the step) in CPU memory or on NVMe (ZeRO-Offload)."""
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    """engine=deepspeed, zero_stage=3: keep parameter partitions in CPU memory or on NVMe (ZeRO-Infinity);
    engine=fsdp: cpu keeps parameter shards, gradients and the optimizer step in CPU memory."""
    reshard_after_forward: bool = True
    """engine=fsdp: free gathered parameters after each layer's forward (gathered again for backward);
    false keeps them until backward: less communication, more memory (ZeRO-2 style)."""
    nvme_path: str | None = None
    """Directory on a local NVMe drive for offload to nvme."""
    overlap_grad_reduce: bool = True
    """engine=megatron on GPUs: reduce each gradient bucket over dp while backward computes the rest."""
    overlap_param_gather: bool = True
    """engine=megatron on GPUs with optim.distributed_optimizer: all-gather the updated parameter
    shards bucket by bucket during the next step's forward instead of after the optimizer step."""
    ddp_bucket_size: int | None = None
    """engine=megatron: gradient bucket size in elements; None: Megatron-LM's max(40M, 1M × dp)."""
    overlap_p2p_comm: bool = True
    """Interleaved pipelines (virtual_pp > 1) on GPUs: overlap stage-to-stage sends with compute."""
    tp_comm_overlap: bool = False
    """Overlap TP all-gather/reduce-scatter with the GEMMs (Transformer Engine userbuffers, GPU only);
    needs sequence_parallel and the TE layer spec."""

    def __post_init__(self) -> None:
        _check(self.ddp_bucket_size is None or self.ddp_bucket_size >= 1,
               f"parallel.ddp_bucket_size must be >= 1 element (or null for the default), got {self.ddp_bucket_size}")
        _check(not self.tp_comm_overlap or self.sequence_parallel,
               "parallel.tp_comm_overlap overlaps the sequence-parallel all-gather/reduce-scatter with GEMMs: "
               "set parallel.sequence_parallel=true (with tp > 1) or parallel.tp_comm_overlap=false")
        _check(self.expert_tp is None or self.expert_tp >= 1,
               f"parallel.expert_tp must be >= 1 (or null: parallel.tp), got {self.expert_tp}")
        for name in ("tp", "pp", "cp", "ep"):
            _check(getattr(self, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.dp is None or self.dp >= 1, f"parallel.dp must be >= 1 (or omitted), got {self.dp}")
        if self.virtual_pp is not None:
            _check(self.virtual_pp >= 1, f"parallel.virtual_pp must be >= 1, got {self.virtual_pp}")
            _check(
                self.virtual_pp == 1 or self.pp > 1,
                f"parallel.virtual_pp({self.virtual_pp}) needs parallel.pp > 1 (interleaving splits pipeline stages)",
            )
        _check(
            not self.sequence_parallel or self.tp > 1,
            "parallel.sequence_parallel needs parallel.tp > 1 (it shards activations over the TP group)",
        )
        from kiln.engine import check_engine_name

        check_engine_name(self.engine)

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def expert_tp_size(self) -> int:
        return self.expert_tp or self.tp


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW through megatron-core's optimizer, with the LR schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms and biases."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """LR after warmup: cosine or linear decay to min_lr, constant, or warmup-stable-decay."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    decay_steps: int | None = None
    """Steps over which the LR decays (after warmup ends); None means until train.max_steps."""
    wsd_decay_fraction: float = 0.2
    """For schedule=wsd: the final fraction of the decay steps that anneal to min_lr."""
    distributed_optimizer: bool = False
    """Shard optimizer state over the data-parallel group (ZeRO-1, megatron-core style)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr({self.min_lr}) must be in [0, optim.lr({self.lr})]")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        _check(self.eps > 0, f"optim.eps must be positive, got {self.eps}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.decay_steps is None or self.decay_steps >= 1, f"optim.decay_steps must be >= 1, got {self.decay_steps}")
        _check(
            0 < self.wsd_decay_fraction <= 1,
            f"optim.wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}",
        )


@dataclass(kw_only=True, slots=True)
class StreamConfig:
    """One dataset of a mixture: its share by proportion, or by how often it repeats."""

    path: str = ""
    """MDS dataset directory (local) or remote URL."""
    proportion: float | None = None
    """Fraction of every epoch drawn from this dataset (all streams give one, or none does)."""
    repeat: float | None = None
    """Upsample (> 1) or downsample (< 1) this dataset by this factor instead."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.streams: every stream needs a path")
        _check(self.proportion is None or self.repeat is None,
               f"data.streams: {self.path} sets both proportion and repeat; give one")
        _check(self.proportion is None or self.proportion > 0,
               f"data.streams: {self.path} proportion must be > 0, got {self.proportion}")
        _check(self.repeat is None or self.repeat > 0, f"data.streams: {self.path} repeat must be > 0, got {self.repeat}")


@dataclass(kw_only=True, slots=True)
class ValConfig:
    """Held-out data evaluated during training (forward only, the same parallel layout)."""

    path: str | None = None
    """MDS dataset of validation samples (e.g. `kiln data prepare` on held-out text); None: no validation."""
    every: int = 0
    """Evaluate every N steps and at the last step; 0 evaluates only at the last step."""
    batches: int = 4
    """Micro-batches per data-parallel rank in each evaluation (the same ones every time)."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"data.val.every must be >= 0, got {self.every}")
        _check(self.batches >= 1, f"data.val.batches must be >= 1, got {self.batches}")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where training samples come from."""

    path: str | None = None
    """MDS dataset directory (local) or remote URL (s3://, gs://, ...); None uses the bundled corpus."""
    streams: list[StreamConfig] | None = None
    """A mixture of datasets instead of `path`: [{path, proportion | repeat}, ...]."""
    val: ValConfig = field(default_factory=ValConfig)
    """Validation split."""
    tokenizer: str | None = None
    """tokenizer.json the dataset was made with; None uses the bundled one."""
    shuffle: bool = True
    """Shuffle samples (deterministically, from train.seed)."""
    num_workers: int = 0
    """Data-loader worker processes per rank."""
    prefetch: int = 4
    """Micro-batches each rank reads ahead in a background thread while the step runs (0: on demand)."""
    reset_attention_at_eos: bool = False
    """Document masking: inside a packed sample no token attends across an end-of-document token, and
    RoPE positions restart at each document (Megatron's reset_attention_mask + reset_position_ids)."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.prefetch >= 0, f"data.prefetch must be >= 0, got {self.prefetch}")
        if self.streams is not None:
            _check(self.path is None, "data.path and data.streams are both set; use streams alone for a mixture")
            _check(len(self.streams) >= 1, "data.streams is empty; list at least one {path, proportion | repeat}")
            kinds = {"proportion" if s.proportion is not None else "repeat" if s.repeat is not None else None
                     for s in self.streams}
            _check(len(kinds) == 1,
                   "data.streams mixes proportion, repeat and neither; give every stream a proportion, "
                   "or every stream a repeat (or none)")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The loop: batch sizes, length, precision, seeding and output."""

    max_steps: int = 300
    """Optimizer steps to run."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 16
    """Samples per optimizer step over all ranks: micro_batch_size × grad accumulation × dp."""
    seed: int = 1234
    """Seeds weights, dropout and data order; the same seed gives the same run."""
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = "bf16"
    """Parameter/compute dtype; bf16 and fp16 keep fp32 master weights in the optimizer. fp16 (with
    dynamic loss scaling) needs parallel.engine=deepspeed. fp8 runs the linear layers' GEMMs in FP8
    (the fp8: section) with bf16 parameters everywhere else; it needs an FP8-capable GPU."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """cuda with NCCL, or cpu with gloo (megatron-core CPU emulation); auto picks cuda when present."""
    log_every: int = 10
    """Print a console line and append a metrics.jsonl record every N steps."""
    run_dir: str | None = None
    """Run directory; None makes runs/<config name>-<timestamp>."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (megatron-core): selective recomputes recompute_modules (default the
    attention core) in backward; full recomputes whole layers (recompute_method, recompute_num_layers)."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """recompute=full: uniform checkpoints every group of recompute_num_layers layers; block
    checkpoints only the first recompute_num_layers layers of each pipeline stage."""
    recompute_num_layers: int = 1
    """recompute=full: layers per recomputed group (uniform) or recomputed layers per stage (block)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """recompute=selective: megatron-core's recompute_modules (core_attn, mlp, layernorm, ...)."""
    gc_every: int = 50
    """Python garbage collection only every N steps, on all ranks at once (Megatron's --manual-gc):
    an automatic collection on one rank stalls every other rank at the next collective. 0: automatic."""
    tf32: bool = True
    """precision=fp32 on GPUs: TF32 tensor-core matmuls and convolutions (10-bit mantissa products)."""
    peak_tflops: float | None = None
    """The accelerator's dense peak TFLOP/s for MFU; None looks the GPU up (kiln.plan.hardware.ACCELERATORS)."""
    memory_check: bool = True
    """Before launch, refuse a layout kiln.plan predicts will not fit the device memory (`--no-memory-check`: false)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "global_batch_size", "log_every", "recompute_num_layers"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.gc_every >= 0, f"train.gc_every must be >= 0 (0: automatic collection), got {self.gc_every}")
        _check(self.peak_tflops is None or self.peak_tflops > 0,
               f"train.peak_tflops must be > 0 (or null to look the GPU up), got {self.peak_tflops}")
        _check(self.recompute == "selective" or self.recompute_modules == ["core_attn"],
               f"train.recompute_modules={self.recompute_modules} only applies to train.recompute=selective "
               f"(it is {self.recompute}); set train.recompute=selective or drop train.recompute_modules")

    @property
    def param_precision(self) -> str:
        """The dtype of parameters and of everything but the FP8 GEMMs: fp8 keeps bf16 parameters."""
        return "bf16" if self.precision == "fp8" else self.precision


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Sharded checkpoints (torch DCP format): cadence, retention, resume (see kiln.checkpoint)."""

    every: int = 0
    """Save every N steps (and at the last step); 0 disables periodic saving."""
    dir: str | None = None
    """Checkpoint directory; None means <train.run_dir>/checkpoints."""
    keep_last: int = 3
    """Keep the newest K checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of N, forever; 0 disables."""
    async_save: bool = True
    """Write in the background while training goes on (YAML key: async)."""
    resume: bool = True
    """Resume from the newest good checkpoint in `dir` when there is one (`--no-resume` sets false)."""
    resume_from: str | None = None
    """Start from this checkpoint (a step directory or a checkpoint directory) when `dir` has none."""
    verify_checksums: bool = True
    """On load, check every file's CRC32 against the manifest (sizes are always checked)."""
    signal_timeout_s: int = 600
    """`kiln train` gives workers this long to save after SIGTERM/SIGUSR1 before killing them."""
    save_on_signal: bool = True
    """SIGTERM/SIGUSR1 (preemption, time limit): finish the step, save, exit with code 75."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"checkpoint.every must be >= 0 (0 disables), got {self.every}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        _check(self.keep_every >= 0, f"checkpoint.keep_every must be >= 0, got {self.keep_every}")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Where metrics go besides the console and metrics.jsonl."""

    wandb: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode; offline writes a run under <run_dir>/wandb that `wandb sync` uploads later; online falls
    back to offline (one warning) without an API key or a reachable server. The launcher (or rank 0 when
    there is none) ships metrics.jsonl to W&B, so a killed worker loses no W&B history (kiln.observe)."""
    wandb_project: str = "kiln"
    wandb_entity: str | None = None
    wandb_name: str | None = None
    """Display name of the W&B run; None means the run directory's name."""
    wandb_group: str | None = None
    """W&B group, to show related runs (a sweep, the seeds of one setting) together."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags, e.g. [baseline, 8b]."""
    wandb_notes: str | None = None
    """Free-text description shown with the W&B run."""
    all_ranks: bool = False
    """Every rank logs to <run_dir>/logs/rank<N>.log; rank 0 always prints to the console."""
    progress: Literal["auto", "bar", "plain"] = "auto"
    """Rank 0's console: bar keeps a live progress line (step/max_steps, loss, tokens/s, ETA) under the
    log lines; plain prints the log lines only; auto is bar on a terminal outside Slurm, else plain."""

    def __post_init__(self) -> None:
        too_long = [tag for tag in self.wandb_tags if not 1 <= len(tag) <= 64]
        _check(not too_long, f"logging.wandb_tags: W&B takes tags of 1 to 64 characters, got {too_long}; "
                             f"shorten or drop them")


@dataclass(kw_only=True, slots=True)
class WatchdogConfig:
    """Hang detection (kiln.trainer.watchdog): when a step overruns its allowance on any rank, every
    rank writes its threads' Python stacks (and on GPUs NCCL's flight recorder) to <run_dir>/logs and
    exits 124. A collective that waits 10 minutes (the process group's timeout) is aborted by NCCL
    or gloo first, with NCCL's flight recorder but no Python stacks: the step allowance is below it."""

    timeout_s: float = 300.0
    """Allowance of one training step (forward, backward, optimizer step); 0 turns the watchdog off."""
    first_step_timeout_s: float = 1800.0
    """Allowance of the first step after a start or resume (compilation, data loader start); 0: unwatched."""
    between_steps_timeout_s: float = 1800.0
    """Allowance of the loop's work after a step: logging, evaluation, checkpoint saves; 0: unwatched."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "first_step_timeout_s", "between_steps_timeout_s"):
            _check(getattr(self, name) >= 0, f"watchdog.{name} must be >= 0 seconds (0: unwatched), "
                   f"got {getattr(self, name)}")


@dataclass(kw_only=True, slots=True)
class GuardConfig:
    """The loss-spike and NaN guard (kiln.trainer.guard), on every rank: what counts as a bad step and
    what happens then. Every event goes to <run_dir>/guard.jsonl, metrics.jsonl and W&B."""

    policy: Literal["skip", "rollback", "disabled"] | None = None
    """skip: drop the bad step's update and go on. rollback: reload the newest checkpoint, replay without
    the bad global batch (quarantined: skipped on every later replay and restart), optionally at a cooled
    LR. disabled: no checks. None: skip, or rollback with the deepspeed engine (it cannot drop an update)."""
    zscore: float = 6.0
    """A loss or grad norm this many standard deviations above the mean of the last `window` good steps
    is a spike (non-finite values always are)."""
    window: int = 100
    """Good steps the mean and deviation are taken over; spikes are looked for once it is full."""
    max_retries: int = 5
    """Bad steps (skips or rollbacks) allowed before `window` good steps have passed; one more stops the run."""
    lr_cooldown_steps: int = 0
    """After a rollback, this many steps run at lr_cooldown_factor × the scheduled LR."""
    lr_cooldown_factor: float = 0.1
    inject_nan_grad_at: list[int] = field(default_factory=list)
    """Fire drill: at these steps (the first time each is reached) every rank's gradients get a NaN, so
    the guard's reaction can be seen on a cluster (like Megatron-LM's error injection)."""

    def __post_init__(self) -> None:
        _check(self.zscore > 0, f"guard.zscore must be > 0 standard deviations, got {self.zscore}")
        _check(self.window >= 2, f"guard.window must be >= 2 steps (a deviation needs two), got {self.window}")
        _check(self.max_retries >= 0, f"guard.max_retries must be >= 0, got {self.max_retries}")
        _check(self.lr_cooldown_steps >= 0, f"guard.lr_cooldown_steps must be >= 0, got {self.lr_cooldown_steps}")
        _check(0 < self.lr_cooldown_factor <= 1,
               f"guard.lr_cooldown_factor must be in (0, 1], got {self.lr_cooldown_factor}")


@dataclass(kw_only=True, slots=True)
class KernelsConfig:
    """Which kernels run the model (kiln.kernels)."""

    attention: Literal["auto", "flash", "te", "sdpa", "flex"] = "auto"
    """Attention backend: flash (flash-attn), te (Transformer Engine DotProductAttention), sdpa (PyTorch
    scaled_dot_product_attention, any device), flex (PyTorch flex attention, block-sparse document masks);
    auto picks the fastest one present for the device and logs the choice."""
    compile: bool = False
    """torch.compile each transformer layer (regional: one compiled graph reused by every layer)."""
    cross_entropy: Literal["chunked", "plain"] = "chunked"
    """chunked (the default) computes the output layer and the loss over cross_entropy_chunk tokens at a time
    (recomputed in backward, one more GEMM over the vocabulary), so the [tokens, vocab] fp32 logits never
    exist at once (kiln.kernels.cross_entropy; bench/cross_entropy.py); plain is megatron-core's."""
    cross_entropy_chunk: int = 4096
    """Tokens per chunk of the chunked cross-entropy."""

    def __post_init__(self) -> None:
        _check(self.cross_entropy_chunk >= 1,
               f"kernels.cross_entropy_chunk must be >= 1 token, got {self.cross_entropy_chunk}")


# Which scaling recipes each FP8 backend offers.
FP8_RECIPES = {"te": ("delayed", "tensorwise", "mxfp8"), "torchao": ("tensorwise", "rowwise")}


@dataclass(kw_only=True, slots=True)
class Fp8Config:
    """train.precision=fp8: which library runs the FP8 GEMMs, and how it scales them."""

    backend: Literal["te", "torchao"] = "te"
    """te: Transformer Engine's FP8 linear layers (needs the TE layer spec); torchao: torchao float8
    training on kiln's linear layers."""
    recipe: Literal["delayed", "tensorwise", "mxfp8", "rowwise"] = "tensorwise"
    """Scaling: delayed (TE: scales from an amax history), tensorwise (current per-tensor scaling),
    mxfp8 (TE, Blackwell: 32-element block scales), rowwise (torchao: per-row scales)."""
    amax_history_len: int = 1024
    """recipe=delayed: steps of amax history kept per tensor."""
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    """recipe=delayed: the scale follows the max of the history, or its newest entry."""

    def __post_init__(self) -> None:
        _check(self.recipe in FP8_RECIPES[self.backend],
               f"fp8.recipe={self.recipe} is not a {self.backend} recipe; fp8.backend={self.backend} offers "
               f"{', '.join(FP8_RECIPES[self.backend])}")
        _check(self.amax_history_len >= 1, f"fp8.amax_history_len must be >= 1, got {self.amax_history_len}")


# YAML spellings that are not valid Python identifiers.
_KEY_ALIASES = {"async": "async_save"}


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """One training run."""

    name: str = "run"
    """Run name (defaults to the config file's stem); used for the run directory and W&B."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    """Used when train.precision=fp8."""
    deepspeed: dict[str, Any] | None = None
    """parallel.engine=deepspeed: extra DeepSpeed config keys, merged over the config kiln generates."""

    def __post_init__(self) -> None:
        self._check_engine()
        if self.train.precision == "fp8":
            from kiln.kernels.fp8 import check_fp8_config

            check_fp8_config(self.fp8, model=self.model, parallel=self.parallel, train=self.train)
        self._check_compile()
        self._check_moe()
        _check(
            self.parallel.cp == 1 or self.model.seq_len % (2 * self.parallel.cp) == 0,
            f"model.seq_len({self.model.seq_len}) must be divisible by 2 × parallel.cp({self.parallel.cp}) "
            f"= {2 * self.parallel.cp} (context parallelism splits the sequence into 2·cp chunks)",
        )
        if self.optim.decay_steps is None:
            return
        _check(
            self.optim.warmup_steps + self.optim.decay_steps <= self.train.max_steps or self.optim.schedule == "constant",
            f"optim.warmup_steps({self.optim.warmup_steps}) + optim.decay_steps({self.optim.decay_steps}) = "
            f"{self.optim.warmup_steps + self.optim.decay_steps} exceeds train.max_steps({self.train.max_steps})",
        )

    def _check_engine(self) -> None:
        """The engine's own checks, and no engine's options section set for another engine."""
        from kiln.engine import ENGINES, engine_class

        engine = engine_class(self.parallel.engine)
        engine.validate(self.parallel, self.optim, self.train)
        _check(self.guard.policy != "skip" or engine.can_skip_update,
               f"guard.policy=skip: the {engine.name} engine cannot drop an update once its gradients exist; "
               f"use guard.policy=rollback (with checkpoint.every > 0) or parallel.engine=megatron")
        for name in ENGINES:
            section = engine_class(name).options_section
            _check(
                section is None or name == self.parallel.engine or getattr(self, section) is None,
                f"the config has a {section}: section but parallel.engine is {self.parallel.engine}; set "
                f"parallel.engine={name} or remove the section",
            )

    def _check_moe(self) -> None:
        """model.moe against the parallel layout, the engine and the kernels (the world-size checks are
        in kiln.parallel.layout)."""
        from kiln.engine import engine_class

        moe, p = self.model.moe, self.parallel
        if not moe.enabled:
            _check(p.ep == 1 and p.expert_tp is None,
                   "parallel.ep and parallel.expert_tp split the experts of MoE layers, and model.moe.num_experts "
                   "is 0 (a dense model): set model.moe.num_experts, or remove parallel.ep/expert_tp")
            return
        why_not = engine_class(p.engine).moe_support
        _check(why_not is None, f"model.moe with parallel.engine={p.engine}: {why_not}; use parallel.engine=megatron")
        _check(moe.num_experts % p.ep == 0,
               f"model.moe.num_experts({moe.num_experts}) is not divisible by parallel.ep({p.ep}): every expert-parallel "
               f"rank holds the same number of experts")
        _check(p.ep > 1 or p.expert_tp_size == p.tp,
               f"parallel.expert_tp({p.expert_tp}) differs from parallel.tp({p.tp}) with parallel.ep=1: megatron-core "
               "splits experts differently from the dense layers only under expert parallelism; set parallel.ep > 1 "
               "or remove parallel.expert_tp")
        _check(self.model.expert_ffn_size % p.expert_tp_size == 0,
               f"the expert ffn size({self.model.expert_ffn_size}) is not divisible by parallel.expert_tp"
               f"({p.expert_tp_size})")
        _check(p.tp == 1 or p.sequence_parallel,
               f"model.moe with parallel.tp={p.tp} needs parallel.sequence_parallel=true: megatron-core routes each "
               "rank's own share of the sequence (without it every TP rank would dispatch the same tokens)")
        _check(not self.kernels.compile,
               "kernels.compile with model.moe: the token dispatcher's split sizes depend on the routing (host "
               "syncs inside the layer), which torch.compile cannot trace; set kernels.compile=false")
        _check(self.train.precision != "fp8" or self.fp8.backend == "te",
               "train.precision=fp8 with fp8.backend=torchao and model.moe: torchao's float8 linears replace the "
               "dense layers' GEMMs only, not the experts'; use fp8.backend=te")

    def _check_compile(self) -> None:
        """kernels.compile against what puts untraceable code inside a transformer layer (kiln.kernels.compile)."""
        from kiln.engine import engine_class

        if not self.kernels.compile:
            return
        p = self.parallel
        _check(not p.sequence_parallel,
               "kernels.compile with parallel.sequence_parallel: megatron-core's sequence-parallel linears "
               "all-gather and reduce-scatter asynchronously inside their autograd functions, which torch.compile "
               "cannot trace; set parallel.sequence_parallel=false or kernels.compile=false")
        _check(p.cp == 1,
               f"kernels.compile with parallel.cp={p.cp}: ring attention exchanges keys and values point to point "
               "inside each layer, which torch.compile cannot trace; set kernels.compile=false (or parallel.cp=1)")
        _check(self.train.recompute != "selective",
               "kernels.compile with train.recompute=selective: megatron-core's checkpoint function saves and "
               "restores RNG states inside the layer, which torch.compile cannot trace; set train.recompute=full "
               "(whole compiled layers are recomputed) or none, or kernels.compile=false")
        hooks = engine_class(p.engine).hooks_inside_layers(p, self.optim, self.train)
        _check(hooks is None, f"kernels.compile cannot trace hooks inside a transformer layer, and parallel.engine="
               f"{p.engine} puts some there: {hooks}; or set kernels.compile=false")

    def engine_options(self) -> dict[str, Any] | None:
        """The running engine's own section (e.g. ``deepspeed:``), or None."""
        from kiln.engine import engine_class

        section = engine_class(self.parallel.engine).options_section
        return getattr(self, section) if section else None

    def layout(self, world_size: int):
        """The validated parallel layout of this run on ``world_size`` ranks (kiln.parallel.layout)."""
        from kiln.parallel.layout import ParallelLayout

        return ParallelLayout.build(self.parallel, self.model, self.train, world_size)

    def dry_run_report(self, world_size: int, vocab_size: int | None = None) -> str:
        """What ``kiln train --dry-run`` prints (kiln.plan.dry_run): layout, parameters, batch arithmetic."""
        from kiln.plan.dry_run import dry_run_report

        return dry_run_report(self.name, self.layout(world_size), model=self.model, parallel=self.parallel,
                              optim=self.optim, train=self.train, data=self.data, vocab_size=vocab_size,
                              kernels=self.kernels)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["checkpoint"]["async"] = out["checkpoint"].pop("async_save")
        return out


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and where lossless, convert) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except KilnConfigError as err:
                errors.append(str(err))
        raise KilnConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise KilnConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise KilnConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise KilnConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise KilnConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise KilnConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise KilnConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise KilnConfigError(f"{key}: expected a string, got {value!r}")
    if _is_dataclass_type(tp):
        return _build(tp, value, key)
    raise KilnConfigError(f"{key}: unsupported setting type {tp}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise KilnConfigError(f"{where}: expected a mapping of settings, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        name = _KEY_ALIASES.get(key, key)
        full = f"{prefix}.{key}" if prefix else str(key)
        if name not in names:
            spellings = [k for k, v in _KEY_ALIASES.items() if v in names] + [n for n in names if n not in _KEY_ALIASES.values()]
            near = difflib.get_close_matches(str(key), spellings, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else ""
            raise KilnConfigError(f"unknown setting '{full}'{hint} (valid: {', '.join(spellings)})")
        kwargs[name] = _coerce(value, hints[name], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise KilnConfigError(f"override {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=3e-4", "parallel.tp=2"]`` → ``[("optim.lr", 3e-4), ("parallel.tp", 2)]``."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise KilnConfigError(f"override '{item}' is not of the form section.key=value (e.g. optim.lr=3e-4)")
        parsed.append((key, yaml.safe_load(text) if text else ""))
    return parsed


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    raw = dict(raw or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    return _build(RunConfig, raw, "")


def read_yaml_mapping(path: str | Path, what: str = "config file", hint: str = "") -> dict[str, Any]:
    """A YAML file that must hold a mapping; every failure is a KilnConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise KilnConfigError(f"{what} {path} does not exist{hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise KilnConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise KilnConfigError(f"{what} {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, and validate everything."""
    raw = read_yaml_mapping(path, hint=" (shipped configs are in configs/)")
    raw.setdefault("name", Path(path).stem)
    return config_from_dict(raw, overrides)


def model_config_from_saved(saved: dict[str, Any]) -> ModelConfig:
    """The ``model:`` section a checkpoint's kiln.json recorded (perhaps by another kiln version:
    settings this version does not know are ignored; a run without model.moe is dense)."""
    def known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(cls)}
        return {key: value for key, value in raw.items() if key in names}

    raw = known(ModelConfig, saved)
    if isinstance(raw.get("moe"), dict):
        raw["moe"] = MoeConfig(**known(MoeConfig, raw["moe"]))
    return ModelConfig(**raw)


def dump_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
