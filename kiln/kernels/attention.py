"""Causal self-attention through ``torch.nn.functional.scaled_dot_product_attention``.

Plugged into megatron-core's local layer spec in place of ``DotProductAttention``, which
materialises the full [b, heads, s, s] score matrix and a mask. SDPA picks a fused kernel
(FlashAttention or memory-efficient on CUDA, a fused CPU kernel otherwise), needs no mask
tensor for causal attention, and handles grouped-query attention without copying keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's core attention: [s, b, heads, d] in, [s, b, heads·d] out."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        if config.context_parallel_size > 1:
            raise NotImplementedError("SDPAttention does not split attention over context-parallel ranks")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes neither packed sequences nor an attention bias")
        # [s, b, h, d] → [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q, k, v,
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=q.size(1) != k.size(1),
        )  # [b, h, s, d]
        s, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, h·d]
