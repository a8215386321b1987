"""Document maps of packed samples, and the attention masks every backend derives from them.

A packed sample holds several documents, each ended by the tokenizer's end-of-document token.
With ``data.reset_attention_at_eos`` the data path gives the model a *document map*: for
every input token, how many end-of-document tokens come before it in its sample ([b, s], the
whole sequence even under context parallelism, where each rank holds only some of it). The
end-of-document token belongs to the document it ends, as in Megatron-LM's
``reset_attention_mask``. Token i may attend to token j when j ≤ i and both have the same
document number; positions (RoPE) count from each document's first token.

Backends need the same fact in different shapes: a dense boolean mask (SDPA, the reference
and the ring's block kernel), a mask function (flex attention), or cumulative sequence
lengths (flash-attn's and TE's variable-length kernels). All are built here, once per
micro-batch: every layer receives the same map object, so the last one built is reused.
"""

from __future__ import annotations

import torch


def document_map(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[b, s] document number of each input token: the end-of-document tokens before it."""
    ends = (inputs == eos_id).to(torch.int32)
    return torch.cumsum(ends, dim=1) - ends  # an eos token still belongs to the document it ends


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[b, s] position of each token inside its own document (RoPE restarts at every document)."""
    s = documents.size(1)
    index = torch.arange(s, device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    # The index of the last document start at or before each token.
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def allowed(q_index: torch.Tensor, k_index: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
    """Boolean [b|1, sq, sk]: which keys each query may attend to (causal, and inside its document).

    ``q_index``/``k_index`` are the positions in the whole sequence of the local queries and keys.
    """
    mask = (q_index[:, None] >= k_index[None, :]).unsqueeze(0)
    if documents is None:
        return mask
    return mask & (documents[:, q_index, None] == documents[:, None, k_index])


def cumulative_lengths(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [n+1], longest document) over the micro-batch flattened sample by sample,
    the layout of flash-attn's and Transformer Engine's variable-length (THD) kernels."""
    b, s = documents.shape
    # Every sample start and every change of document starts a sequence.
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    offsets = torch.nonzero(starts.reshape(-1)).squeeze(1).to(torch.int32)
    cu = torch.cat([offsets, torch.tensor([b * s], dtype=torch.int32, device=documents.device)])
    return cu, int((cu[1:] - cu[:-1]).max())


class LastMaskCache:
    """Keeps the mask built for the most recent document map (all layers of a forward share it).

    It holds the map itself, so the object compared by identity cannot be freed and replaced by
    another at the same address.
    """

    def __init__(self) -> None:
        self._documents: torch.Tensor | None = None
        self._extra = None
        self._value = None

    def get(self, documents: torch.Tensor, extra, build):
        if documents is not self._documents or extra != self._extra:
            self._documents, self._extra, self._value = documents, extra, build()
        return self._value
