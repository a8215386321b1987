"""kiln's GPT model: megatron-core's GPTModel with a training forward of its own.

megatron-core's ``GPTModel.forward`` serves inference, multi-token prediction and packed THD
batches; kiln's training step needs three things it does not give:

* RoPE at each token's own position (``position_ids``), so positions restart at every
  document of a packed sample (megatron-core derives RoPE from the sequence length only);
* a document map handed to kiln's attention as ``attention_mask`` (kiln.kernels.attention);
* the loss through kiln's cross-entropy (kiln.kernels.cross_entropy), which never builds the
  whole [tokens, vocab] logits tensor.

Everything else (embedding, decoder block, output layer, sharded state dict, pipeline input
tensors) is GPTModel's own, so checkpoints and layouts are unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


def rotary_frequencies(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE angles at each token's position, laid out as megatron-core applies them.

    ``positions`` [b, s] → [s, 1, 1, d] when every sample has the same positions (the shape the
    fused RoPE kernels take), else [s, b, 1, d] (documents restart at different offsets).
    """
    if positions.size(0) > 1 and not bool((positions == positions[:1]).all()):
        rows = positions
    else:
        rows = positions[:1]
    angles = rows.to(inv_freq.device, torch.float32).unsqueeze(-1) * inv_freq  # [b|1, s, d/2]
    emb = torch.cat((angles, angles), dim=-1)  # megatron-core's non-interleaved layout
    return emb.transpose(0, 1).unsqueeze(2)  # [s, b|1, 1, d]


class KilnGPTModel(GPTModel):
    """GPTModel whose ``forward(input_ids, position_ids, attention_mask, labels)`` returns the loss
    per token [b, s] on the last pipeline stage (hidden states on the others)."""

    def __init__(self, *args, cross_entropy: str = "chunked", cross_entropy_chunk: int = 4096, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cross_entropy = cross_entropy
        self.cross_entropy_chunk = cross_entropy_chunk

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, *, last_token_logits: bool = False,
                **unused):
        """``last_token_logits`` (no labels): logits of the last position only [b, 1, v/tp], which is
        all sampling needs (the whole [b, s, v/tp] tensor is large at long contexts and big vocabularies)."""
        if unused.get("inference_context") is not None or unused.get("packed_seq_params") is not None:
            raise NotImplementedError("KilnGPTModel.forward is kiln's training forward; it takes neither "
                                      "an inference context nor packed THD parameters")
        decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids) if self.pre_process else None
        inv_freq = self.rotary_pos_emb.inv_freq
        if inv_freq.device != position_ids.device:  # megatron-core keeps it as a plain attribute
            self.rotary_pos_emb.inv_freq = inv_freq = inv_freq.to(position_ids.device)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                              rotary_pos_emb=rotary_frequencies(inv_freq, position_ids))
        if not self.post_process:
            return hidden
        if last_token_logits:
            hidden = hidden[-1:]  # [1, b, h]
        return self.language_model_loss(hidden, labels)

    def language_model_loss(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Loss per token [b, s] in fp32 from the final hidden states [s, b, h]; logits [b, s, v/tp]
        when ``labels`` is None."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if labels is not None and self.cross_entropy == "chunked":
            from kiln.kernels.cross_entropy import output_layer_cross_entropy

            return output_layer_cross_entropy(self.output_layer, hidden, labels, weight=weight,
                                              chunk_tokens=self.cross_entropy_chunk)
        logits, _ = self.output_layer(hidden, weight=weight)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)
