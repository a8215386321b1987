"""kiln's megatron-core GPT ↔ Hugging Face ``LlamaForCausalLM``: tensor names, layouts, config.

The one place that knows how the two models correspond (pure torch, no megatron-core, no
transformers); kiln.hf.mixtral gives the same machinery its mixture-of-experts layers (a shape's
``layer_weights``). kiln's side uses the *global* names a kiln checkpoint holds
(``kiln ckpt inspect``): the layers stacked into one tensor per weight, ``[num_layers, …]``
(``decoder.layers.mlp.linear_fc2.weight``); per-layer names (``decoder.layers.3.…``) are read too.

Layouts that differ:

* Attention: megatron-core fuses Q, K and V into ``linear_qkv`` and orders its rows by query
  group (``SelfAttention.get_query_key_value_tensors``): for each of the ``num_query_groups``
  groups, its ``heads / groups`` query heads, then its key head, then its value head, each
  ``head_dim`` rows. HF keeps ``q_proj``, ``k_proj``, ``v_proj`` apart, heads in order.
  Both apply RoPE in the non-interleaved (rotate-half) layout, so rows within a head match.
* SwiGLU: ``linear_fc1`` is ``[gate; up]``, HF's ``gate_proj`` and ``up_proj``.
* Norms: the per-layer RMSNorm gains are ``linear_qkv.layer_norm_weight`` and
  ``linear_fc1.layer_norm_weight`` in a checkpoint whichever layer spec wrote it (megatron-core
  maps the local spec's ``input_layernorm`` / ``pre_mlp_layernorm`` onto them); both are read.
* Vocabulary: kiln pads the embedding and output rows (``make_vocab_divisible_by × tp``); HF
  holds exactly ``vocab_size`` rows. Export trims, import pads with zero rows (never looked up:
  no token has their ids, and their zero logits are masked by nothing but trained away from).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from kiln.errors import KilnCheckpointError, KilnConfigError

LAYERS = "decoder.layers."
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
QKV = "self_attention.linear_qkv.weight"
FC1 = "mlp.linear_fc1.weight"
# Per-layer kiln suffix → the HF names it holds (``model.layers.{i}.`` + name), in order.
LAYER_WEIGHTS: dict[str, tuple[str, ...]] = {
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    QKV: ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),
    FC1: ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
# The local layer spec's module names of the same norms (as in a plain ``state_dict()``).
NORM_ALIASES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
HF_LAYER = "model.layers.{layer}."
# In an HF name: one HF tensor per expert, stacked along the kiln tensor's experts axis (Mixtral).
EXPERT = "{expert}"
HF_EMBEDDING, HF_FINAL_NORM, HF_OUTPUT = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
# Buffers some HF versions saved; they are recomputed from the config, never weights.
HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes both sides agree on; ``vocab_size`` unpadded (the tokenizer's)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool
    # What the HF side is: its name in messages, and per-layer kiln suffix → HF names.
    family: ClassVar[str] = "Llama"
    layer_weights: ClassVar[dict[str, tuple[str, ...]]] = LAYER_WEIGHTS

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, model, vocab_size: int) -> "LlamaShape":
        """From a kiln ``ModelConfig``."""
        return cls(model.num_layers, model.hidden_size, model.num_attention_heads, model.query_groups,
                   model.ffn_size, vocab_size, model.tie_embeddings)


# -- the family interface (kiln.hf.families picks this module or kiln.hf.mixtral) ----------------
ARCHITECTURE = "LlamaForCausalLM"
FORMAT = "hf-llama"


def shape_of(model, vocab_size: int) -> LlamaShape:
    return LlamaShape.of(model, vocab_size)


# -- attention and MLP layouts ----------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    """HF q/k/v projections → megatron's ``linear_qkv`` rows, grouped per query group."""
    groups, d = shape.num_kv_heads, shape.head_dim
    per_group = (q.reshape(groups, shape.heads_per_group * d, -1), k.reshape(groups, d, -1), v.reshape(groups, d, -1))
    return torch.cat(per_group, dim=1).reshape(groups * (shape.heads_per_group + 2) * d, -1)


def split_qkv(qkv: torch.Tensor, shape: LlamaShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's ``linear_qkv`` → HF (q, k, v) projections."""
    groups, d = shape.num_kv_heads, shape.head_dim
    q, k, v = qkv.reshape(groups, (shape.heads_per_group + 2) * d, -1).split(
        [shape.heads_per_group * d, d, d], dim=1)
    return (q.reshape(shape.num_heads * d, -1), k.reshape(groups * d, -1), v.reshape(groups * d, -1))


def _join(suffix: str, parts: list[torch.Tensor], shape: LlamaShape) -> torch.Tensor:
    if suffix == QKV:
        return fuse_qkv(*parts, shape)
    return torch.cat(parts) if len(parts) > 1 else parts[0]  # an fc1 = [gate; up]


def _split(suffix: str, tensor: torch.Tensor, shape: LlamaShape) -> tuple[torch.Tensor, ...]:
    if suffix == QKV:
        return split_qkv(tensor, shape)
    return tuple(tensor.chunk(len(shape.layer_weights[suffix])))  # an fc1 → (gate, up)


def _experts(hf_names: tuple[str, ...], shape: LlamaShape) -> list[int | None]:
    """The experts a per-layer weight holds one HF tensor each of (only a Mixtral shape has experts),
    or [None] for a plain weight."""
    return list(range(shape.num_experts)) if EXPERT in hf_names[0] else [None]


def pad_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """The vocab table with zero rows appended up to ``rows`` (kiln's padded size)."""
    if table.shape[0] > rows:
        raise KilnCheckpointError(f"the vocabulary table has {table.shape[0]} rows, more than the padded "
                                  f"size {rows}; set model.vocab_size to the HF config's vocab_size")
    return torch.cat([table, table.new_zeros(rows - table.shape[0], *table.shape[1:])])


# -- kiln → HF ----------------------------------------------------------------------------------
def layer_tensors(kiln: dict[str, torch.Tensor]) -> tuple[dict[tuple[int, str], torch.Tensor], dict[str, torch.Tensor]]:
    """({(layer, suffix): tensor}, {other name: tensor}) from stacked or per-layer kiln names."""
    layers, rest = {}, {}
    for name, tensor in kiln.items():
        per_layer = _PER_LAYER.match(name)
        if per_layer:
            suffix = per_layer.group(2)
            layers[int(per_layer.group(1)), NORM_ALIASES.get(suffix, suffix)] = tensor
        elif name.startswith(LAYERS):
            suffix = name[len(LAYERS):]
            for index, one in enumerate(tensor.unbind(0)):
                layers[index, NORM_ALIASES.get(suffix, suffix)] = one
        else:
            rest[name] = tensor
    return layers, rest


def kiln_to_hf(kiln: dict[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """Full kiln model tensors (global names) → HF ``LlamaForCausalLM`` (or Mixtral) state dict (vocab unpadded)."""
    layers, rest = layer_tensors(kiln)
    unknown = sorted({suffix for _, suffix in layers} - set(shape.layer_weights))
    unknown += sorted(set(rest) - {EMBEDDING, FINAL_NORM, OUTPUT})
    if unknown:
        raise KilnCheckpointError(f"the checkpoint holds tensors a {shape.family} model has no place for "
                                  f"({', '.join(unknown)}); only kiln's Llama-style GPT (RMSNorm, SwiGLU, RoPE, no "
                                  f"biases; MoE as Mixtral) exports to HF")
    hf: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_layers):
        for suffix, hf_names in shape.layer_weights.items():
            if (layer, suffix) not in layers:
                raise KilnCheckpointError(f"the checkpoint has no {LAYERS}{suffix} for layer {layer}; "
                                          f"it is incomplete or not a {shape.num_layers}-layer kiln GPT")
            experts = _experts(hf_names, shape)
            per_expert = layers[layer, suffix].unbind(0) if experts != [None] else [layers[layer, suffix]]
            for expert, tensor in zip(experts, per_expert):
                for hf_name, part in zip(hf_names, _split(suffix, tensor, shape)):
                    hf[HF_LAYER.format(layer=layer) + hf_name.format(expert=expert)] = part
    hf[HF_EMBEDDING] = _required(rest, EMBEDDING)[: shape.vocab_size]
    hf[HF_FINAL_NORM] = _required(rest, FINAL_NORM)
    if not shape.tie_embeddings:
        hf[HF_OUTPUT] = _required(rest, OUTPUT)[: shape.vocab_size]
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def _required(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise KilnCheckpointError(f"the checkpoint has no {name}; it is incomplete or not a kiln GPT")
    return tensors[name]


# -- HF → kiln ----------------------------------------------------------------------------------
def kiln_tensor_from_hf(name: str, index: tuple[int, ...], read: Callable[[str], torch.Tensor], shape: LlamaShape,
                        padded_vocab: int) -> torch.Tensor:
    """One full kiln tensor from HF tensors (``read(hf_name)``), or for a layer weight (``name``
    ``decoder.layers.<suffix>``) its slice at ``index``: ``(layer,)``, or ``(layer, expert)`` for
    one expert's, so a rank reads only what it holds."""
    if name.startswith(LAYERS):
        suffix = NORM_ALIASES.get(name[len(LAYERS):], name[len(LAYERS):])
        if suffix not in shape.layer_weights:
            raise KilnConfigError(f"kiln's model has {name}, which a {shape.family} model has no weight for")
        hf_names = shape.layer_weights[suffix]
        prefix = HF_LAYER.format(layer=index[0])

        def joined(expert: int | None) -> torch.Tensor:  # one expert's HF tensors (None: a plain weight's)
            return _join(suffix, [read(prefix + hf_name.format(expert=expert)) for hf_name in hf_names], shape)

        if len(index) > 1:
            return joined(index[1])
        experts = _experts(hf_names, shape)
        return joined(None) if experts == [None] else torch.stack([joined(expert) for expert in experts])
    if name == EMBEDDING:
        return pad_rows(read(HF_EMBEDDING), padded_vocab)
    if name == FINAL_NORM:
        return read(HF_FINAL_NORM)
    if name == OUTPUT:
        return pad_rows(read(HF_EMBEDDING if shape.tie_embeddings else HF_OUTPUT), padded_vocab)
    raise KilnConfigError(f"kiln's model has {name}, which a {shape.family} model has no weight for")


def hf_to_kiln(hf: dict[str, torch.Tensor], shape: LlamaShape, padded_vocab: int) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` (or Mixtral) state dict → full kiln tensors under the checkpoint's global names."""
    check_hf_names(hf, shape)

    def read(hf_name: str) -> torch.Tensor:
        return hf[hf_name]

    kiln = {LAYERS + suffix: torch.stack([kiln_tensor_from_hf(LAYERS + suffix, (layer,), read, shape, padded_vocab)
                                          for layer in range(shape.num_layers)])
            for suffix in shape.layer_weights}
    for name in (EMBEDDING, FINAL_NORM, *(() if shape.tie_embeddings else (OUTPUT,))):
        kiln[name] = kiln_tensor_from_hf(name, (), read, shape, padded_vocab)
    return kiln


def hf_names(shape: LlamaShape) -> set[str]:
    """The tensor names of an HF model of this shape (``lm_head`` only when untied)."""
    names = {HF_LAYER.format(layer=layer) + hf_name.format(expert=expert) for layer in range(shape.num_layers)
             for hf_names_ in shape.layer_weights.values() for expert in _experts(hf_names_, shape)
             for hf_name in hf_names_}
    return names | {HF_EMBEDDING, HF_FINAL_NORM} | (set() if shape.tie_embeddings else {HF_OUTPUT})


def check_hf_names(names, shape: LlamaShape, where: str = "the HF model") -> None:
    """The HF tensors must be exactly the model's of this shape (a tied model may also carry lm_head)."""
    present = {name for name in names if not HF_IGNORED.match(name)}
    expected = hf_names(shape)
    missing = sorted(expected - present)
    extra = sorted(present - expected - ({HF_OUTPUT} if shape.tie_embeddings else set()))
    if missing or extra:
        listed = "; ".join(part for part in (f"missing {', '.join(missing[:5])}" if missing else "",
                                             f"unexpected {', '.join(extra[:5])}" if extra else "") if part)
        raise KilnConfigError(f"{where} does not hold the tensors of a {shape.num_layers}-layer {shape.family} model "
                              f"as its config.json describes ({listed}); biases and other architectures do not import")


# -- config.json --------------------------------------------------------------------------------
def hf_config(model, shape: LlamaShape, dtype: str, eos_id: int | None, bos_id: int | None) -> dict[str, Any]:
    """``config.json`` of the exported ``LlamaForCausalLM`` (kiln ``ModelConfig`` → LlamaConfig fields)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": model.seq_len,
        "rope_theta": float(model.rope_theta),
        "rope_scaling": None,
        "rms_norm_eps": model.norm_eps,
        "tie_word_embeddings": shape.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": model.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def model_section_from_hf(config: dict[str, Any], where: str) -> dict[str, Any]:
    """kiln's ``model:`` settings of an HF Llama ``config.json``; refuses what kiln's GPT cannot express."""
    require_model_type(config, where, "llama", ARCHITECTURE)
    return {**decoder_section(config, where), "ffn_hidden_size": config["intermediate_size"]}


def require_model_type(config: dict[str, Any], where: str, model_type: str, architecture: str) -> None:
    architectures = config.get("architectures") or []
    if config.get("model_type") != model_type or (architectures and architectures != [architecture]):
        raise KilnConfigError(f"{where} describes a {config.get('model_type')!r} model ({', '.join(architectures) or '?'}); "
                              f"kiln imports only Llama and Mixtral models (model_type llama, LlamaForCausalLM; "
                              f"mixtral, MixtralForCausalLM)")


def decoder_section(config: dict[str, Any], where: str, refusals: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``model:`` settings a Llama-style decoder's ``config.json`` shares (all but the MLP's), or one
    error naming each of its settings kiln's GPT cannot express (``refusals``: the caller's own)."""
    refusals = list(refusals)
    if config.get("rope_scaling"):
        refusals.append(f"rope_scaling {config['rope_scaling']} (kiln's RoPE has no scaling; long-context "
                        f"variants such as Llama 3.1's do not import)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            refusals.append(f"{key} true (kiln's linear layers have no biases)")
    if config.get("hidden_act", "silu") != "silu":
        refusals.append(f"hidden_act {config['hidden_act']!r} (kiln's MLP is SwiGLU: silu)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, hidden // heads):
        refusals.append(f"head_dim {config['head_dim']} (kiln's is hidden_size / num_attention_heads = {hidden // heads})")
    theta = float(config.get("rope_theta", 10000.0))
    if theta != int(theta):  # megatron-core takes the RoPE base as an integer
        refusals.append(f"rope_theta {theta} (kiln's RoPE base is a whole number)")
    if refusals:
        raise KilnConfigError(f"{where}: kiln's Llama-style GPT cannot hold this model: {'; '.join(refusals)}")
    return {
        "num_layers": config["num_hidden_layers"],
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": config.get("num_key_value_heads") or heads,
        "vocab_size": config["vocab_size"],
        "rope_theta": theta,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "seq_len": config.get("max_position_embeddings", 2048),
        "init_std": config.get("initializer_range", 0.02),
    }
