"""Analytic parameter counts of kiln's Llama-style megatron-core GPTModel (nothing is built).

The model is megatron-core's GPTModel with kiln's layer spec: a vocab-parallel word
embedding, per layer an RMSNorm, a fused QKV projection and an output projection (no
biases), an RMSNorm and a SwiGLU MLP (fc1 holds gate and up, fc2 is down), then a final
RMSNorm and the output layer. RoPE has no parameters. With Transformer Engine the two
per-layer norms are fused into the following linear layer (``layer_norm_weight``), which
changes where the weight lives, not how many there are.
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

    @property
    def total(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return self.embedding + self.num_layers * self.per_layer + self.final_norm + self.output_layer

    @property
    def non_embedding(self) -> int:
        """Parameters outside the embedding and output layer (what scaling laws count)."""
        return self.num_layers * self.per_layer + self.final_norm

    def per_stage(self, layout: ParallelLayout) -> list[int]:
        """Parameters held by each pipeline rank (summed over its virtual chunks, whole TP group).

        The embedding sits on the first stage; the final norm and output layer on the last.
        With tied embeddings and pp > 1 the last stage also holds a copy of the embedding as its
        output weight (megatron-core keeps the copies equal with an all-reduce over the
        embedding group), so the stages then sum to more than ``total`` by one embedding.
        """
        return [sharded + replicated for sharded, replicated in self._stage_parts(layout)]

    def per_rank(self, layout: ParallelLayout) -> list[int]:
        """Parameters on one rank of each pipeline stage: TP-sharded weights ÷ tp, plus the
        RMSNorm weights, which every TP rank holds whole. Exact for a validated layout."""
        return [sharded // layout.tp + replicated for sharded, replicated in self._stage_parts(layout)]

    def _stage_parts(self, layout: ParallelLayout) -> list[tuple[int, int]]:
        """Per pipeline rank: (TP-sharded parameters, replicated parameters)."""
        if layout.tp != self.tp:
            raise ValueError(f"counted for tp={self.tp} (vocab padding depends on it), but the layout has tp={layout.tp}")
        sharded_layer = self.per_layer - self.per_layer_norms
        parts = []
        for rank, chunks in enumerate(layout.stage_layers(self.num_layers)):
            layers = sum(end - start for start, end in chunks)
            sharded, replicated = layers * sharded_layer, layers * self.per_layer_norms
            if rank == 0:
                sharded += self.embedding
            if rank == layout.pp - 1:
                replicated += self.final_norm
                if not self.tie_embeddings:
                    sharded += self.output_layer
                elif layout.pp > 1:
                    sharded += self.embedding  # the last stage's copy of the tied weight
            parts.append((sharded, replicated))
        return parts


def count_parameters(model: ModelConfig, vocab_size: int, tp: int = 1) -> ParamCount:
    """Count the parameters of ``model`` with a ``vocab_size`` tokenizer, vocab padded for ``tp``."""
    hidden, head_dim = model.hidden_size, model.head_dim
    vocab = padded_vocab_size(vocab_size, model, tp)
    qkv = hidden * (model.num_attention_heads * head_dim + 2 * model.query_groups * head_dim)
    attn_out = model.num_attention_heads * head_dim * hidden
    fc1 = hidden * 2 * model.ffn_size  # SwiGLU: gate and up projections, fused
    fc2 = model.ffn_size * hidden
    norms = 2 * hidden  # input RMSNorm + pre-MLP RMSNorm
    embedding = vocab * hidden
    return ParamCount(
        embedding=embedding,
        per_layer=qkv + attn_out + fc1 + fc2 + norms,
        per_layer_norms=norms,
        final_norm=hidden,
        output_layer=0 if model.tie_embeddings else embedding,
        num_layers=model.num_layers,
        padded_vocab=vocab,
        tie_embeddings=model.tie_embeddings,
        tp=tp,
    )


def human(n: float) -> str:
    """Short count: ``8.03B``, ``124.67M``, ``4.19K``, ``512``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:g}"


def human_exact(n: int) -> str:
    """Short and exact: ``8.03B (8,030,261,248)``; small numbers just with separators."""
    return f"{human(n)} ({n:,})" if abs(n) >= 1000 else f"{n:,}"
