"""``kiln train CONFIG --dry-run --world-size N``: the plan of a run, without running it.

Validates the parallel layout against the model and batch settings (raising the same
:class:`~kiln.errors.KilnConfigError` a real launch would), then prints who does what: the
rank groups of every parallel axis, the model, its parameters per pipeline stage and per
rank, and the batch arithmetic. Pure arithmetic: no process group is created, no model is
built, nothing is read except (when ``model.vocab_size`` is unset) the tokenizer file.
"""

from __future__ import annotations

import logging

from kiln.config import DataConfig, KernelsConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from kiln.errors import KilnConfigError
from kiln.parallel.layout import ParallelLayout
from kiln.plan.params import ParamCount, count_parameters, human, human_exact, moe_routing

logger = logging.getLogger(__name__)


def resolve_vocab_size(model: ModelConfig, data: DataConfig) -> int:
    """``model.vocab_size``, or else the vocabulary size of the run's tokenizer."""
    if model.vocab_size is not None:
        return model.vocab_size
    # Imported here: the tokenizer module pulls in Hugging Face tokenizers, which a dry run of
    # a preset (vocab_size set) never needs.
    from kiln.data.tokenizer import bundled_tokenizer_path, load_tokenizer

    path = data.tokenizer or bundled_tokenizer_path()
    try:
        return load_tokenizer(path).vocab_size
    except KilnConfigError:
        raise
    except Exception as err:  # a missing or unreadable file: say which setting to fix
        raise KilnConfigError(
            f"model.vocab_size is unset and the tokenizer {path} (data.tokenizer) cannot be read: {err}; "
            "point data.tokenizer at your tokenizer.json or set model.vocab_size"
        ) from err


def dry_run_report(name: str, layout: ParallelLayout, *, model: ModelConfig, parallel: ParallelConfig,
                   optim: OptimConfig, train: TrainConfig, data: DataConfig, vocab_size: int | None = None,
                   kernels: KernelsConfig | None = None) -> str:
    """Describe a run on its (validated) layout as text.

    ``vocab_size`` overrides the config's (and saves reading the tokenizer); when None it is
    ``model.vocab_size``, or the tokenizer's.
    """
    world_size, p = layout.world_size, parallel
    vocab = vocab_size if vocab_size is not None else resolve_vocab_size(model, data)
    params = count_parameters(model, vocab, tp=layout.tp)

    lines = [f"kiln dry run: {name} on {world_size} ranks (no process group created, no model built)", ""]

    lines.append("layout")
    lines += ["  " + line for line in layout.describe().splitlines()]
    from kiln.engine import engine_class

    engine = engine_class(p.engine).describe(p)
    lines.append(
        f"  engine {engine}, precision {train.precision}, device {train.device}, "
        f"sequence parallel {_yes(p.sequence_parallel)}, distributed optimizer {_yes(optim.distributed_optimizer)}"
    )
    lines.append("  " + _attention_line(kernels or KernelsConfig(), data, model, layout))
    lines.append("")

    pad = params.padded_vocab - vocab
    padding = (
        f"padded +{pad:,} to {params.padded_vocab:,} = multiple of {model.make_vocab_divisible_by} × tp {layout.tp}"
        if pad
        else f"no padding needed for {model.make_vocab_divisible_by} × tp {layout.tp}"
    )
    lines += [
        "model",
        f"  {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads / "
        f"{model.query_groups} kv heads (head dim {model.head_dim}), ffn {model.ffn_size}, seq_len {model.seq_len}",
        f"  vocab {vocab:,} ({padding}), embeddings {'tied' if model.tie_embeddings else 'untied'}",
    ]
    is_moe = model.moe.enabled
    if is_moe:
        lines += _moe_lines(model)
    lines.append("")

    lines += ["parameters", f"  total {human_exact(params.total)}"]
    if is_moe:
        lines.append(f"  active per token {human_exact(params.active)}: {moe_routing(model)}")
    lines.append(
        f"  embedding {human(params.embedding)}, {_layer_sizes(params, model)}, "
        f"final norm {params.final_norm:,}, output layer "
        + (human(params.output_layer) if params.output_layer else "tied to the embedding"))
    share = f"tp-sharded weights / tp {layout.tp}, " + (
        f"routed experts / (ep {layout.ep} × expert_tp {layout.expert_tp}), norms and routers replicated" if is_moe
        else "norms replicated")
    lines.append(f"  per pipeline stage (one rank's share: {share}):")
    rows = []
    for stage, (chunks, whole, rank, experts) in enumerate(zip(
            layout.stage_layers(model.num_layers), params.per_stage(layout), params.per_rank(layout),
            params.experts_per_rank(layout))):
        where = f"stage {stage}: layers " + ", ".join(f"{start}-{end - 1}" for start, end in chunks)
        if stage == 0:
            where += " + embedding"
        if stage == layout.pp - 1:
            where += " + final norm" + _output_piece(model.tie_embeddings, layout.pp)
        rows.append((where, human_exact(whole), human(rank) + (f" (routed experts {human(experts)})" if is_moe else "")))
    width = max(len(where) for where, _, _ in rows)
    swidth = max(len(whole) for _, whole, _ in rows)
    lines += [f"    {where:<{width}}  {whole:<{swidth}}  per rank {rank}" for where, whole, rank in rows]
    if model.tie_embeddings and layout.pp > 1:
        lines.append("    (tied embeddings with pp > 1: the stages sum to the total plus that one copy)")
    lines.append("")

    accum = layout.num_microbatches(train)
    tokens = train.global_batch_size * model.seq_len
    lines += [
        "batch",
        f"  global batch {train.global_batch_size} sequences = micro-batch {train.micro_batch_size} × dp {layout.dp} "
        f"× {accum} grad-accumulation micro-batches",
        f"  tokens per step {tokens:,} = {train.global_batch_size} × seq_len {model.seq_len} ({human(tokens)}); "
        f"{train.max_steps:,} steps = {human(tokens * train.max_steps)} tokens",
    ]
    return "\n".join(lines)


def _moe_lines(model: ModelConfig) -> list[str]:
    moe, layers = model.moe, model.moe.moe_layers(model.num_layers)
    where = (f"all {model.num_layers} layers" if len(layers) == model.num_layers else
             f"{len(layers)} of {model.num_layers} layers (layer_freq {moe.layer_freq}: "
             f"{', '.join(map(str, layers[:3]))}{', …' if len(layers) > 3 else ''}), the others dense")
    shared = f"{moe.shared_experts} shared expert{'s' if moe.shared_experts > 1 else ''}" if moe.shared_experts \
        else "no shared experts"
    dropping = "dropless" if moe.capacity_factor is None else \
        f"capacity factor {moe.capacity_factor:g} (an expert drops its " + \
        ("lowest-probability" if moe.drop_policy == "probs" else "last") + " tokens past it)"
    balancing = [f"{moe.load_balancing} × {moe.aux_loss_coeff:g}"] if moe.load_balancing != "none" and \
        moe.aux_loss_coeff else []
    if moe.expert_bias:
        balancing.append("expert bias (aux-loss-free)")
    if moe.z_loss_coeff:
        balancing.append(f"z-loss × {moe.z_loss_coeff:g}")
    return [
        f"  MoE in {where}: {moe.num_experts} experts of ffn {model.expert_ffn_size}, top-{moe.top_k} "
        f"({moe.score_function} router), {shared}",
        f"  MoE dispatch {moe.token_dispatcher}, {dropping}; router {', '.join(balancing) or 'none'}",
    ]


def _layer_sizes(params: ParamCount, model: ModelConfig) -> str:
    """One dense and one MoE layer's parameters (whichever the model has)."""
    if not params.moe_layer_ids:
        return f"per layer {human(params.per_layer)}"
    moe = model.moe
    rest = params.per_moe_layer - params.moe_experts - params.moe_router
    rest_name = "attention, shared experts and norms" if moe.shared_experts else "attention and norms"
    layer = (f"per MoE layer {human(params.per_moe_layer)} ({moe.num_experts} experts × "
             f"{human(params.moe_experts // moe.num_experts)}, router {human(params.moe_router)}, "
             f"{rest_name} {human(rest)})")
    if len(params.moe_layer_ids) == params.num_layers:
        return layer
    return f"per dense layer {human(params.per_layer)}, {layer}"


def _attention_line(kernels: KernelsConfig, data: DataConfig, model: ModelConfig, layout: ParallelLayout) -> str:
    masks = "document masks (data.reset_attention_at_eos)" if data.reset_attention_at_eos else "causal"
    line = f"attention {kernels.attention}, {masks}"
    if layout.cp > 1:
        chunk = model.seq_len // (2 * layout.cp)
        line += (f"; context parallel: each cp rank holds 2 chunks of {chunk} tokens ({2 * chunk} of {model.seq_len} "
                 f"per sequence), keys/values pass {layout.cp - 1} ring hops per layer")
    return line


def _output_piece(tied: bool, pp: int) -> str:
    if not tied:
        return " + output"
    # Tied: with one stage the output layer reads the embedding; with more, the last stage
    # keeps its own copy of it (megatron-core all-reduces the two copies' gradients).
    return " + output (copy of embedding)" if pp > 1 else " (output tied to embedding)"


def _yes(flag: bool) -> str:
    return "on" if flag else "off"
