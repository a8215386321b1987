"""Analytic parameter counts of kiln's Llama-style megatron-core GPTModel (nothing is built).

The model is megatron-core's GPTModel with kiln's layer spec: a vocab-parallel word
embedding, per layer an RMSNorm, a fused QKV projection and an output projection (no
biases), an RMSNorm and a SwiGLU MLP (fc1 holds gate and up, fc2 is down), then a final
RMSNorm and the output layer. RoPE has no parameters. With Transformer Engine the two
per-layer norms are fused into the following linear layer (``layer_norm_weight``), which
changes where the weight lives, not how many there are.

A mixture-of-experts layer (model.moe) has the same attention and norms; its MLP is a router
(num_experts × hidden, replicated on every rank), ``num_experts`` SwiGLU experts (split over
ep × expert_tp) and optionally shared experts (one SwiGLU of shared_experts × the expert width,
split over tp like a dense MLP). A token passes through top_k of the routed experts: its
*active* parameters, which FLOPs per token count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kiln.config import ModelConfig

if TYPE_CHECKING:  # only for annotations: keep this module importable without megatron
    from kiln.parallel.layout import ParallelLayout

logger = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, model: ModelConfig, tp: int = 1) -> int:
    """The embedding table's row count: ``vocab_size`` rounded up to a multiple of
    ``model.make_vocab_divisible_by × tp``, as Megatron does, so every TP rank holds an equal
    slice. The one place kiln computes this: the model builder calls it too.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    multiple = model.make_vocab_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True, slots=True)
class ParamCount:
    """Parameter counts of one model, whole and by piece (unique parameters, no copies)."""

    embedding: int
    """Word embeddings: padded vocab × hidden (first pipeline stage)."""
    per_layer: int
    """One transformer layer, norms included."""
    per_layer_norms: int
    """The part of ``per_layer`` that is RMSNorm weights (replicated over TP, not sharded)."""
    final_norm: int
    """Final RMSNorm (last pipeline stage; replicated over TP)."""
    output_layer: int
    """Output projection: padded vocab × hidden, or 0 when tied to the embedding."""
    num_layers: int
    padded_vocab: int
    tie_embeddings: bool
    tp: int
    """The TP size the vocab was padded for; per-stage counts need a layout with the same tp."""
    moe_layer_ids: tuple[int, ...] = ()
    """The MoE layers (0-based); the others are dense (``per_layer``)."""
    per_moe_layer: int = 0
    """One MoE layer, norms, router, routed and shared experts included."""
    moe_router: int = 0
    """The router of one MoE layer (replicated on every rank)."""
    moe_experts: int = 0
    """The routed experts of one MoE layer (split over ep × expert_tp)."""
    moe_active_experts: int = 0
    """The routed-expert parameters one token passes through in one MoE layer (top_k experts)."""

    def layer_size(self, layer: int) -> int:
        return self.per_moe_layer if layer in self.moe_layer_ids else self.per_layer

    @property
    def layers_total(self) -> int:
        return sum(self.layer_size(layer) for layer in range(self.num_layers))

    @property
    def total(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return self.embedding + self.layers_total + self.final_norm + self.output_layer

    @property
    def active(self) -> int:
        """Parameters one token passes through: the total less the routed experts it is not sent to."""
        return self.total - len(self.moe_layer_ids) * (self.moe_experts - self.moe_active_experts)

    @property
    def non_embedding(self) -> int:
        """Parameters outside the embedding and output layer (what scaling laws count)."""
        return self.layers_total + self.final_norm

    def layer_per_rank(self, layout: ParallelLayout) -> float:
        """The largest transformer layer's parameters on one rank (its sharded parts divided)."""
        dense = (self.per_layer - self.per_layer_norms) / layout.tp + self.per_layer_norms
        if not self.moe_layer_ids:
            return dense
        sharded, replicated, experts = self._layer_parts(self.moe_layer_ids[0])
        return max(dense, sharded / layout.tp + replicated + experts / (layout.ep * layout.expert_tp))

    def per_stage(self, layout: ParallelLayout) -> list[int]:
        """Parameters held by each pipeline rank (summed over its virtual chunks, whole TP group).

        The embedding sits on the first stage; the final norm and output layer on the last.
        With tied embeddings and pp > 1 the last stage also holds a copy of the embedding as its
        output weight (megatron-core keeps the copies equal with an all-reduce over the
        embedding group), so the stages then sum to more than ``total`` by one embedding.
        """
        return [sum(parts) for parts in self._stage_parts(layout)]

    def per_rank(self, layout: ParallelLayout) -> list[int]:
        """Parameters on one rank of each pipeline stage: TP-sharded weights ÷ tp, routed experts
        ÷ (ep × expert_tp), plus the RMSNorm weights and routers, which every rank holds whole.
        Exact for a validated layout."""
        return [sharded // layout.tp + replicated + experts // (layout.ep * layout.expert_tp)
                for sharded, replicated, experts in self._stage_parts(layout)]

    def experts_per_rank(self, layout: ParallelLayout) -> list[int]:
        """Of :meth:`per_rank`, the routed experts' parameters: megatron-core reduces their gradients and
        shards their optimizer state over expert_dp, not dp × cp."""
        return [experts // (layout.ep * layout.expert_tp) for _, _, experts in self._stage_parts(layout)]

    def _layer_parts(self, layer: int) -> tuple[int, int, int]:
        """One layer's (TP-sharded, replicated, expert-sharded) parameters."""
        if layer not in self.moe_layer_ids:
            return self.per_layer - self.per_layer_norms, self.per_layer_norms, 0
        replicated = self.per_layer_norms + self.moe_router
        return self.per_moe_layer - replicated - self.moe_experts, replicated, self.moe_experts

    def _stage_parts(self, layout: ParallelLayout) -> list[tuple[int, int, int]]:
        """Per pipeline rank: (TP-sharded, replicated, expert-sharded parameters)."""
        if layout.tp != self.tp:
            raise ValueError(f"counted for tp={self.tp} (vocab padding depends on it), but the layout has tp={layout.tp}")
        parts = []
        for rank, chunks in enumerate(layout.stage_layers(self.num_layers)):
            layer_parts = [self._layer_parts(layer) for start, end in chunks for layer in range(start, end)]
            sharded, replicated, experts = (sum(column) for column in zip(*layer_parts))
            if rank == 0:
                sharded += self.embedding
            if rank == layout.pp - 1:
                replicated += self.final_norm
                if not self.tie_embeddings:
                    sharded += self.output_layer
                elif layout.pp > 1:
                    sharded += self.embedding  # the last stage's copy of the tied weight
            parts.append((sharded, replicated, experts))
        return parts


def count_parameters(model: ModelConfig, vocab_size: int, tp: int = 1) -> ParamCount:
    """Count the parameters of ``model`` with a ``vocab_size`` tokenizer, vocab padded for ``tp``."""
    hidden, head_dim = model.hidden_size, model.head_dim
    vocab = padded_vocab_size(vocab_size, model, tp)
    qkv = hidden * (model.num_attention_heads * head_dim + 2 * model.query_groups * head_dim)
    attn_out = model.num_attention_heads * head_dim * hidden
    norms = 2 * hidden  # input RMSNorm + pre-MLP RMSNorm
    attention = qkv + attn_out
    embedding = vocab * hidden
    moe = model.moe
    expert = swiglu_parameters(hidden, model.expert_ffn_size)
    router = moe.num_experts * hidden
    shared = swiglu_parameters(hidden, moe.shared_experts * model.expert_ffn_size)
    return ParamCount(
        embedding=embedding,
        per_layer=attention + swiglu_parameters(hidden, model.ffn_size) + norms,
        per_layer_norms=norms,
        final_norm=hidden,
        output_layer=0 if model.tie_embeddings else embedding,
        num_layers=model.num_layers,
        padded_vocab=vocab,
        tie_embeddings=model.tie_embeddings,
        tp=tp,
        moe_layer_ids=tuple(moe.moe_layers(model.num_layers)),
        per_moe_layer=attention + norms + router + moe.num_experts * expert + shared if moe.enabled else 0,
        moe_router=router,
        moe_experts=moe.num_experts * expert,
        moe_active_experts=moe.top_k * expert if moe.enabled else 0,
    )


def swiglu_parameters(hidden: int, ffn: int) -> int:
    """A SwiGLU MLP: fc1 holds the gate and up projections (hidden → 2 × ffn), fc2 is down."""
    return hidden * 2 * ffn + ffn * hidden


def matmul_parameters_per_token(model: ModelConfig) -> int:
    """The transformer layers' matmul weights one token is multiplied by (norms excluded): attention
    and the dense MLPs, and in MoE layers the router, its top_k experts and the shared experts."""
    h = model.hidden_size
    kv = model.query_groups * model.head_dim
    attention = h * model.num_attention_heads * model.head_dim * 2 + 2 * h * kv
    moe = model.moe
    total = 0
    for layer in range(model.num_layers):
        if moe.is_moe_layer(layer):
            total += attention + moe.num_experts * h + swiglu_parameters(
                h, (moe.top_k + moe.shared_experts) * model.expert_ffn_size)
        else:
            total += attention + swiglu_parameters(h, model.ffn_size)
    return total


def moe_routing(model: ModelConfig) -> str:
    """How an MoE model's tokens are routed, in words: ``top-2 of 8 experts in 16 MoE layers``."""
    moe = model.moe
    shared = f" (+ {moe.shared_experts} shared)" if moe.shared_experts else ""
    return f"top-{moe.top_k} of {moe.num_experts} experts{shared} in {len(moe.moe_layers(model.num_layers))} MoE layers"


def human(n: float) -> str:
    """Short count: ``8.03B``, ``124.67M``, ``4.19K``, ``512``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:g}"


def human_exact(n: int) -> str:
    """Short and exact: ``8.03B (8,030,261,248)``; small numbers just with separators."""
    return f"{human(n)} ({n:,})" if abs(n) >= 1000 else f"{n:,}"
