"""Context parallelism: ring attention over the CP group, point to point, any backend (gloo, NCCL).

Each sequence is cut into 2·cp chunks and CP rank r holds chunks r and 2·cp−1−r (see
:func:`local_positions`): under a causal mask the early chunks see few keys and the late ones
many, so pairing them gives every rank the same work. Queries stay put; key/value blocks
travel around the ring, one hop per step, while the current block is computed on. Partial
results are merged with their log-sum-exp, so the output is exactly softmax attention over
the whole sequence.

Backward runs the ring again: each block's key/value gradients travel with the block and,
after cp hops, arrive back on the rank that owns it. The block kernel is plain PyTorch in
fp32 (it materialises one [b, heads, s/cp, s/cp] score block at a time); on GPUs with
Transformer Engine, ``kernels.attention=te`` uses TE's fused context-parallel attention instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kiln.kernels.documents import allowed

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


def _exchange(tensor: torch.Tensor, send_to: int, receive_from: int, group, tag: int):
    """Send ``tensor`` one hop along the ring and receive the previous rank's; (buffer, requests)."""
    buffer = torch.empty_like(tensor)
    requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, send_to, group, tag),
                                       dist.P2POp(dist.irecv, buffer, receive_from, group, tag)])
    return buffer, requests


def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _expand(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query keys/values [b, kv_heads, s, d] → one per query head, as SDPA's enable_gqa does."""
    return t.float().repeat_interleave(heads // t.size(1), dim=1)


def _scores(q, k, mask, scale):
    """Scaled scores of the local queries against one key block, −inf where masked: [b, h, sq, sk]."""
    scores = (q.float() @ _expand(k, q.size(1)).transpose(-1, -2)) * scale
    return scores.masked_fill(~mask.unsqueeze(1), float("-inf"))


def _probabilities(scores, lse):
    """exp(scores − lse), zero where masked (a row with no key at all gives zeros, not nan)."""
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite.unsqueeze(-1))


def _block_forward(q, k, v, mask, scale):
    """Attention of the local queries to one key/value block: (out fp32, log-sum-exp)."""
    scores = _scores(q, k, mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return _probabilities(scores, lse) @ _expand(v, q.size(1)), lse


def _merge(out, lse, block_out, block_lse):
    """Two partial softmax attentions over disjoint keys → one (the online-softmax update)."""
    merged = torch.logaddexp(lse, block_lse)
    empty = torch.isinf(merged)  # no key seen yet on either side
    old = torch.where(empty, torch.zeros_like(lse), torch.exp(lse - merged))
    new = torch.where(empty, torch.zeros_like(lse), torch.exp(block_lse - merged))
    return out * old.unsqueeze(-1) + block_out * new.unsqueeze(-1), merged


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, documents, scale, group):
        rank, size = group.rank(), group.size()
        send_to = dist.get_global_rank(group, (rank + 1) % size)
        receive_from = dist.get_global_rank(group, (rank - 1) % size)
        local = q.size(2)
        q_index = local_positions(local, rank, size, q.device)
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for step in range(size):
            if step < size - 1:
                incoming, requests = _exchange(kv, send_to, receive_from, group, _KV_TAG)
            holder = (rank - step) % size
            mask = allowed(q_index, local_positions(local, holder, size, q.device), documents)
            if bool(mask.any()):
                out, lse = _merge(out, lse, *_block_forward(q, kv[0], kv[1], mask, scale))
            if step < size - 1:
                _wait(requests)
                kv = incoming
        ctx.save_for_backward(q, k, v, out, lse, documents)
        ctx.scale, ctx.group, ctx.peers = scale, group, (send_to, receive_from)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, documents = ctx.saved_tensors
        group, scale, (send_to, receive_from) = ctx.group, ctx.scale, ctx.peers
        rank, size = group.rank(), group.size()
        heads, kv_heads, local = q.size(1), k.size(1), q.size(2)
        q_index = local_positions(local, rank, size, q.device)
        grad_out = grad_out.float()
        row_dot = (grad_out * out).sum(-1, keepdim=True)  # [b, h, sq, 1]
        grad_q = torch.zeros_like(out)
        kv = torch.stack([k, v]).contiguous()
        grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # travels with its block
        for step in range(size):
            if step < size - 1:
                incoming, kv_requests = _exchange(kv, send_to, receive_from, group, _KV_TAG)
            holder = (rank - step) % size
            mask = allowed(q_index, local_positions(local, holder, size, q.device), documents)
            if bool(mask.any()):
                p = _probabilities(_scores(q, kv[0], mask, scale), lse)
                grad_p = grad_out @ _expand(kv[1], heads).transpose(-1, -2)
                grad_scores = p * (grad_p - row_dot) * scale
                grad_q += grad_scores @ _expand(kv[0], heads)
                b, _, sk, d = kv[0].shape
                grad_k = (grad_scores.transpose(-1, -2) @ q.float()).view(b, kv_heads, heads // kv_heads, sk, d)
                grad_v = (p.transpose(-1, -2) @ grad_out).view(b, kv_heads, heads // kv_heads, sk, d)
                grad_kv[0] += grad_k.sum(2)
                grad_kv[1] += grad_v.sum(2)
            grad_kv, grad_requests = _exchange(grad_kv, send_to, receive_from, group, _GRAD_TAG)
            _wait(grad_requests)
            if step < size - 1:
                _wait(kv_requests)
                kv = incoming
        return grad_q.to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype), None, None, None
