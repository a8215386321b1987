"""kiln's core attention: one module, several kernels, document masks and context parallelism.

``KilnAttention`` sits where megatron-core's layer spec puts core attention (after the QKV
projection and RoPE, before the output projection): [s, b, heads, d] in, [s, b, heads·d]
out, grouped-query keys and values unexpanded. Its ``attention_mask`` argument is kiln's
document map (kiln.kernels.documents), or None for plain causal attention.

Backends (``kernels.attention``):

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, on any device. Causal runs
  need no mask (FlashAttention / cuDNN / memory-efficient kernels on GPUs, a fused CPU
  kernel); document masks go in as a boolean mask (memory-efficient kernel on GPUs).
* ``flex``: PyTorch flex attention, compiled, with a block-sparse document mask: blocks
  wholly outside every document are skipped. GPU only (PyTorch has no CPU backward for it).
* ``flash``: flash-attn, with ``flash_attn_varlen_func`` over the documents when masked.
* ``te``: Transformer Engine's ``DotProductAttention`` (through megatron-core's wrapper),
  THD variable-length batches for documents, and TE's own context-parallel attention.

With ``parallel.cp > 1`` every backend but ``te`` runs kiln's ring attention
(kiln.kernels.ring_attention). The choice is made once per run by :func:`choose_backend`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from kiln.errors import KilnConfigError
from kiln.kernels.documents import LastMaskCache, allowed, cumulative_lengths

log = logging.getLogger(__name__)

BACKENDS = ("te", "flash", "flex", "sdpa")
"""Fastest first: the order ``auto`` tries them in on a GPU."""


def backend_missing(name: str, device_type: str) -> str | None:
    """None when backend ``name`` can train on ``device_type``; else why not and how to get it."""
    from kiln.kernels.spec import transformer_engine_missing

    gpu_only = f"kernels.attention={name} runs on NVIDIA GPUs; this run is on {device_type} (use sdpa)"
    if name == "sdpa":
        return None
    if name == "flex":
        if device_type != "cuda":
            return gpu_only + " (PyTorch's flex attention has no CPU backward)"
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return "kernels.attention=flex needs PyTorch >= 2.5 (torch.nn.attention.flex_attention)"
        return None
    if device_type != "cuda":
        return gpu_only
    if name == "flash":
        if importlib.util.find_spec("flash_attn") is None:
            return "kernels.attention=flash needs flash-attn: pip install flash-attn --no-build-isolation"
        return None
    missing = transformer_engine_missing()
    if missing:
        return f"kernels.attention=te needs Transformer Engine ({missing}): pip install 'kiln[gpu]'"
    return None


def choose_backend(requested: str, device_type: str, *, documents: bool, cp: int, precision: str = "bf16") -> str:
    """The backend a run uses: ``requested``, or for ``auto`` the fastest present one; a
    KilnConfigError (before launch) when the requested one cannot run here."""
    if requested == "auto":
        order = BACKENDS if device_type == "cuda" else ("sdpa",)
        for name in order:
            # Dense document masks in SDPA are the slow path: on GPUs flex's block mask is preferred.
            if (backend_missing(name, device_type) is None and not (name == "te" and documents and cp > 1)
                    and not (name == "flash" and precision == "fp32")):
                return name
    reason = backend_missing(requested, device_type)
    if reason:
        raise KilnConfigError(reason)
    if requested == "flash" and precision == "fp32":
        raise KilnConfigError("kernels.attention=flash: flash-attn computes in bf16/fp16 only and train.precision is "
                              "fp32; use kernels.attention=sdpa (or te) for fp32 runs")
    if requested == "te" and documents and cp > 1:
        raise KilnConfigError("kernels.attention=te with data.reset_attention_at_eos and parallel.cp > 1: TE's "
                              "context parallelism splits each document separately (THD), which kiln's data path "
                              "does not; use kernels.attention=flex (or sdpa): kiln's ring attention masks documents")
    return requested


def core_attention_spec(backend: str):
    """What megatron-core's layer spec builds as core attention for this backend."""
    return functools.partial(KilnAttention, backend=backend)


class KilnAttention(MegatronModule):
    """Causal self-attention with optional document masks, on the chosen backend."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, *, backend: str = "sdpa") -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"KilnAttention is causal self-attention, got mask type {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError("KilnAttention has no attention dropout (pre-training runs without it)")
        self.backend = backend
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.cp_group = pg_collection.cp if pg_collection is not None and config.context_parallel_size > 1 else None
        self._masks = LastMaskCache()
        if backend == "te":
            from megatron.core.extensions.transformer_engine import TEDotProductAttention

            self.te = TEDotProductAttention(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                                            attention_type=attention_type, softmax_scale=softmax_scale,
                                            cp_comm_type=cp_comm_type or "p2p", pg_collection=pg_collection)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("KilnAttention takes document maps, not packed THD parameters or a bias")
        documents = attention_mask
        if self.backend == "te":
            return self._te(query, key, value, documents)
        if self.cp_group is not None:
            from kiln.kernels.ring_attention import ring_attention

            return ring_attention(query, key, value, documents, self.scale, self.cp_group)
        s, b = query.size(0), query.size(1)
        if self.backend == "flash":
            out = self._flash(query, key, value, documents)  # [b, s, h, d]
            return out.transpose(0, 1).reshape(s, b, -1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = self._flex(q, k, v, documents) if self.backend == "flex" else self._sdpa(q, k, v, documents)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, h·d]

    # -- backends: [b, h, s, d] (sdpa, flex), [s, b, h, d] (flash, te) -------------------------
    def _sdpa(self, q, k, v, documents):
        gqa = q.size(1) != k.size(1)
        if documents is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        index = torch.arange(q.size(2), device=q.device)
        mask = self._masks.get(documents, "dense", lambda: allowed(index, index, documents).unsqueeze(1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)

    def _flex(self, q, k, v, documents):
        from torch.nn.attention.flex_attention import create_block_mask

        b, s = q.size(0), q.size(2)

        def causal(batch, head, q_index, k_index):
            return q_index >= k_index

        def causal_in_document(batch, head, q_index, k_index):
            return (q_index >= k_index) & (documents[batch, q_index] == documents[batch, k_index])

        block_mask = self._masks.get(documents, ("flex", s), lambda: create_block_mask(
            causal if documents is None else causal_in_document, B=None if documents is None else b, H=None,
            Q_LEN=s, KV_LEN=s, device=q.device))
        return flex_attention_for(q.device.type)(q, k, v, block_mask=block_mask, scale=self.scale,
                                                 enable_gqa=q.size(1) != k.size(1))

    def _flash(self, query, key, value, documents):
        import flash_attn

        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, h, d]
        if documents is None:
            return flash_attn.flash_attn_func(q, k, v, softmax_scale=self.scale, causal=True)
        b, s = documents.shape
        cu, longest = self._masks.get(documents, "varlen", lambda: cumulative_lengths(documents))
        flat = [t.reshape(b * s, t.size(2), t.size(3)) for t in (q, k, v)]
        out = flash_attn.flash_attn_varlen_func(*flat, cu, cu, longest, longest, softmax_scale=self.scale,
                                                causal=True)
        return out.view(b, s, out.size(1), out.size(2))

    def _te(self, query, key, value, documents):
        if documents is None:
            return self.te(query, key, value, None, attn_mask_type=AttnMaskType.causal)
        from megatron.core.packed_seq_params import PackedSeqParams

        s, b = query.size(0), query.size(1)
        cu, longest = self._masks.get(documents, "varlen", lambda: cumulative_lengths(documents))
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
        q, k, v = (t.transpose(0, 1).reshape(b * s, t.size(2), t.size(3)) for t in (query, key, value))
        out = self.te(q, k, v, None, attn_mask_type=AttnMaskType.padding_causal, packed_seq_params=packed)
        return out.view(b, s, -1).transpose(0, 1)  # [s, b, h·d]


@functools.cache
def flex_attention_for(device_type: str):
    """flex attention is only fast compiled (eager, it materialises the scores): compiled once per
    process on GPUs; eager elsewhere, where it only serves forward-only checks."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def reference_attention(query, key, value, documents, scale: float) -> torch.Tensor:
    """Plain softmax(QKᵀ·scale + mask)·V in fp32 with keys and values expanded per query group:
    what every backend is tested against. [s, b, h, d] in, [s, b, h·d] out."""
    s, b, heads = query.shape[:3]
    q, k, v = (t.permute(1, 2, 0, 3).float() for t in (query, key, value))
    k, v = (t.repeat_interleave(heads // t.size(1), dim=1) for t in (k, v))
    index = torch.arange(s, device=query.device)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed(index, index, documents).unsqueeze(1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.permute(2, 0, 1, 3).reshape(s, b, -1).to(query.dtype)
