"""Context parallelism: ring attention over the CP group, point to point, any backend (gloo, NCCL).

Each sequence is cut into 2·cp chunks and CP rank r holds chunks r and 2·cp−1−r (see
:func:`local_positions`): under a causal mask the early chunks see few keys and the late ones
many, so pairing them gives every rank the same work. Queries stay put; key/value blocks
travel around the ring, one hop per step, while the current block is computed on. Partial
results are merged with their log-sum-exp, so the output is exactly softmax attention over
the whole sequence.

Backward runs the ring again: each block's key/value gradients travel with the block and,
after cp hops, arrive back on the rank that owns it. Each block is cut into its four chunk
pairs and the hidden ones are skipped (:func:`_sub_blocks`). The kernel of a part is
PyTorch's fused flash-attention kernel for CPUs (it returns the log-sum-exp the merge needs);
elsewhere plain PyTorch in fp32, materialising one [b, heads, s/2cp, s/2cp] part at a time.
On GPUs with Transformer Engine, ``kernels.attention=te`` uses TE's fused context-parallel
attention instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kiln.kernels.documents import allowed
from kiln.parallel.collectives import ring_exchange

_KV_TAG, _GRAD_TAG = 1, 2  # keys/values and their gradients cross the same links in backward


def local_positions(local_len: int, rank: int, size: int, device=None) -> torch.Tensor:
    """Positions in the whole sequence of the ``local_len`` tokens CP rank ``rank`` holds."""
    chunk = local_len // 2
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([first, last])


def split_for_context_parallel(tensor: torch.Tensor, rank: int, size: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's two chunks of a whole-sequence tensor, along ``dim``."""
    chunks = tensor.chunk(2 * size, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim=dim)


def ring_attention(query, key, value, documents, scale: float, group) -> torch.Tensor:
    """[s/cp, b, h, d] local queries, keys and values → [s/cp, b, h·d] attention over the whole sequence."""
    s, b = query.size(0), query.size(1)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
    out = _RingAttention.apply(q, k, v, documents, scale, group)
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _expand(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query keys/values [b, kv_heads, s, d] → one per query head, as SDPA's enable_gqa does."""
    return t.repeat_interleave(heads // t.size(1), dim=1)


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per-query-head key/value gradients → per kv head (the sum over each group)."""
    b, heads, s, d = grad.shape
    return grad.view(b, kv_heads, heads // kv_heads, s, d).sum(2)


def _sub_blocks(mask: torch.Tensor):
    """(query slice, key slice, mask or None when all visible) of the parts of a block that
    attend at all. Each rank's tokens are two chunks, so a block is 2 × 2 chunk pairs; under
    the causal mask a pair is wholly visible, wholly hidden, or the diagonal, and the hidden
    ones (half of every off-diagonal block) are skipped: the balance that the chunking buys."""
    half_q, half_k = mask.size(-2) // 2, mask.size(-1) // 2
    for qs in (slice(0, half_q), slice(half_q, None)):
        for ks in (slice(0, half_k), slice(half_k, None)):
            part = mask[:, qs, ks]
            if not bool(part.any()):
                continue
            if bool(part.all()):
                yield qs, ks, None
            elif part.size(1) == part.size(2) and torch.equal(part, _causal(part.size(1), part.device).expand_as(part)):
                yield qs, ks, CAUSAL  # the kernels' own causal path, without a mask tensor
            else:
                yield qs, ks, part


CAUSAL = "causal"
"""A part that is exactly the causal triangle (a chunk against itself, no document boundary)."""


def _causal(n: int, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


# Masked scores for PyTorch's fused CPU kernel: finite, so a row with no visible key yields
# exp(−1e30 − lse) = 0 weight when merged instead of nan (every row sees its own key in the end).
_HIDDEN = -1e30


def _additive(mask, dtype) -> torch.Tensor | None:
    if mask is None or mask is CAUSAL:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, _HIDDEN).unsqueeze(1)


def _fused_cpu_kernel(q: torch.Tensor) -> bool:
    """PyTorch's flash-attention kernel for CPUs (False makes CPU runs take the portable path too)."""
    return q.device.type == "cpu" and FUSED_CPU_KERNEL


FUSED_CPU_KERNEL = True


def _masked_scores(q, k, mask, scale) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is CAUSAL:
        mask = _causal(q.size(2), q.device).unsqueeze(0)
    return scores if mask is None else scores.masked_fill(~mask.unsqueeze(1), _HIDDEN)


def _block_forward(q, k, v, mask, scale):
    """Attention of queries [b, h, sq, d] to one key/value part: (out fp32, log-sum-exp [b, h, sq])."""
    k, v = _expand(k, q.size(1)), _expand(v, q.size(1))
    if _fused_cpu_kernel(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask is CAUSAL, attn_mask=_additive(mask, q.dtype), scale=scale)
        return out.float(), lse.float()
    scores = _masked_scores(q, k, mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v.float(), lse


def _block_backward(grad_out, q, k, v, out, lse, mask, scale):
    """Gradients of one part given the final output and log-sum-exp: (dq fp32, dk, dv per kv head)."""
    kv_heads = k.size(1)
    k, v = _expand(k, q.size(1)), _expand(v, q.size(1))
    if _fused_cpu_kernel(q):
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, mask is CAUSAL, attn_mask=_additive(mask, q.dtype),
            scale=scale)
        grad_q, grad_k, grad_v = (g.float() for g in grads)
    else:
        scores = _masked_scores(q, k, mask, scale)
        p = torch.exp(scores - lse.unsqueeze(-1))
        grad_scores = p * (grad_out @ v.float().transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True)) * scale
        grad_q = grad_scores @ k.float()
        grad_k, grad_v = grad_scores.transpose(-1, -2) @ q.float(), p.transpose(-1, -2) @ grad_out
    return grad_q, _fold(grad_k, kv_heads), _fold(grad_v, kv_heads)


def _merge(out, lse, block_out, block_lse):
    """Two partial softmax attentions over disjoint keys → one (the online-softmax update)."""
    merged = torch.logaddexp(lse, block_lse)
    return out * torch.exp(lse - merged).unsqueeze(-1) + block_out * torch.exp(block_lse - merged).unsqueeze(-1), merged


def _walk_ring(kv, q_index, documents, group, peers):
    """Each step's (key/value block held, its visible parts): the next hop is posted before the
    caller computes on the block, and awaited when the caller asks for the next step."""
    rank, size = group.rank(), group.size()
    for step in range(size):
        if step < size - 1:
            incoming, requests = ring_exchange(kv, *peers, group, _KV_TAG)
        holder = (rank - step) % size
        yield kv, _sub_blocks(allowed(q_index, local_positions(q_index.numel(), holder, size, q_index.device),
                                      documents))
        if step < size - 1:
            _wait(requests)
            kv = incoming


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, documents, scale, group):
        rank, size = group.rank(), group.size()
        send_to = dist.get_global_rank(group, (rank + 1) % size)
        receive_from = dist.get_global_rank(group, (rank - 1) % size)
        local = q.size(2)
        q_index = local_positions(local, rank, size, q.device)
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = torch.full(q.shape[:3], _HIDDEN, device=q.device)  # finite: merging never meets −inf − (−inf)
        for kv, parts in _walk_ring(torch.stack([k, v]).contiguous(), q_index, documents, group,
                                    (send_to, receive_from)):
            for qs, ks, part in parts:
                out[:, :, qs], lse[:, :, qs] = _merge(out[:, :, qs], lse[:, :, qs],
                                                      *_block_forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks],
                                                                      part, scale))
        ctx.save_for_backward(q, k, v, out, lse, documents)
        ctx.scale, ctx.group, ctx.peers = scale, group, (send_to, receive_from)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, documents = ctx.saved_tensors
        group, scale, (send_to, receive_from) = ctx.group, ctx.scale, ctx.peers
        rank, size = group.rank(), group.size()
        local = q.size(2)
        q_index = local_positions(local, rank, size, q.device)
        grad_out = grad_out.float()
        grad_q = torch.zeros_like(out)
        kv = torch.stack([k, v]).contiguous()
        grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # travels with its block
        for kv, parts in _walk_ring(kv, q_index, documents, group, (send_to, receive_from)):
            for qs, ks, part in parts:
                dq, dk, dv = _block_backward(grad_out[:, :, qs], q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks],
                                             out[:, :, qs], lse[:, :, qs], part, scale)
                grad_q[:, :, qs] += dq
                grad_kv[0][:, :, ks] += dk
                grad_kv[1][:, :, ks] += dv
            if size > 1:  # the gradients follow their block one hop
                grad_kv, grad_requests = ring_exchange(grad_kv, send_to, receive_from, group, _GRAD_TAG)
                _wait(grad_requests)
        return grad_q.to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype), None, None, None
