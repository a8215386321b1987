"""``kiln generate CKPT --prompt TEXT``: sample a continuation from a checkpoint, for a quick look
at what the model writes.

The model, its layout and the tokenizer come from the checkpoint's run config (kiln.json); it
runs on one process and device by default (CUDA when present), or tensor-parallel with
``--nproc-per-node N parallel.tp=N``. There is no KV cache: every new token runs the model over
the whole window again (the last model.seq_len tokens), which keeps training's forward the only
forward and is fine for a look at a few hundred tokens, not for serving.

Each step gathers the last position's logits over the TP group, drops the padded vocabulary
rows (kiln pads the embedding to a multiple of make_vocab_divisible_by × tp; those rows are
never sampled), and picks the next token: the most likely one at temperature 0, else a draw
from softmax(logits / temperature) over the top-k tokens, from a generator seeded by --seed.
Rank 0's choice is broadcast, so every rank continues with the same token. Generation stops at
the tokenizer's end-of-text token or after --max-new-tokens.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass

import torch

from kiln.errors import KilnConfigError

log = logging.getLogger("kiln")

DEFAULT_MAX_NEW_TOKENS = 100
DEFAULT_TEMPERATURE = 0.8  # a little sharper than the model's distribution: readable, not repetitive
DEFAULT_TOP_K = 50


@dataclass(frozen=True)
class Sampling:
    temperature: float = DEFAULT_TEMPERATURE
    """0: greedy (the most likely token)."""
    top_k: int = DEFAULT_TOP_K
    """Draw among the k most likely tokens only; 0: among all."""
    seed: int = 0

    def check(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise KilnConfigError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise KilnConfigError(f"--top-k must be >= 0 (0: no top-k cut), got {self.top_k}")


@dataclass(frozen=True)
class Generation:
    prompt_tokens: list[int]
    new_tokens: list[int]
    text: str
    """Prompt and continuation, decoded together (the end-of-text token left out)."""
    mean_log_likelihood: float
    """Mean log-probability (nats) of the new tokens under the model's own distribution
    (temperature 1, no top-k): above -log(vocab size) when the model prefers what it wrote."""
    stopped_at_eos: bool


def choose_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from one position's logits [vocab] (padded rows already removed)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    scaled = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.numel():
        kth_largest = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    probs = torch.softmax(scaled, dim=-1).cpu()  # drawn on the CPU: the same draw on every device
    return int(torch.multinomial(probs, 1, generator=generator))


def last_token_logits(model, window: list[int], vocab_size: int, ctx) -> torch.Tensor:
    """Logits [vocab_size] of the token after ``window``: the whole vocabulary (gathered over TP),
    without the padding rows."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    ids = torch.tensor([window], dtype=torch.long, device=ctx.device)  # [1, s]
    positions = torch.arange(len(window), device=ctx.device).unsqueeze(0)  # [1, s]
    local = model(ids, positions, last_token_logits=True)  # [1, 1, padded_vocab / tp]
    full = gather_from_tensor_model_parallel_region(local, group=ctx.pg_collection.tp)  # [1, 1, padded_vocab]
    return full[0, -1, :vocab_size].float()


@torch.no_grad()
def generate(model, ctx, tokenizer, vocab_size: int, prompt: str, *, max_new_tokens: int, sampling: Sampling,
             seq_len: int) -> Generation:
    """Continue ``prompt`` on every rank of the (TP) model; every rank returns the same result."""
    from kiln.parallel import collectives

    prompt_tokens = tokenizer.encode(prompt)
    tokens = list(prompt_tokens)
    generator = torch.Generator().manual_seed(sampling.seed)
    log_likelihood = 0.0
    stopped_at_eos = False
    for _ in range(max_new_tokens):
        logits = last_token_logits(model, tokens[-seq_len:], vocab_size, ctx)
        chosen = collectives.broadcast_object(choose_token(logits, sampling, generator) if ctx.rank == 0 else None)
        log_likelihood += float(torch.log_softmax(logits, dim=-1)[chosen])
        if chosen == tokenizer.eos_id:
            stopped_at_eos = True
            break
        tokens.append(chosen)
    new_tokens = tokens[len(prompt_tokens):]
    steps = len(new_tokens) + stopped_at_eos
    return Generation(prompt_tokens=prompt_tokens, new_tokens=new_tokens, text=tokenizer.decode(tokens),
                      mean_log_likelihood=log_likelihood / steps if steps else float("nan"),
                      stopped_at_eos=stopped_at_eos)


def check_generate_layout(config) -> None:
    p = config.parallel
    if p.pp != 1 or p.cp != 1 or (p.virtual_pp or 1) != 1:
        raise KilnConfigError(f"generate runs with parallel.pp=1 cp=1 (got pp={p.pp} cp={p.cp}); pass parallel.pp=1 "
                              f"parallel.cp=1 and split a large model with parallel.tp instead")


def cmd_generate(args: argparse.Namespace) -> int:
    from kiln.data.tokenizer import bundled_tokenizer_path, load_tokenizer
    from kiln.inference.command import run_on_ranks
    from kiln.inference.load import load_model, open_checkpoint

    if not args.prompt:
        raise KilnConfigError("--prompt is empty; give the text to continue, e.g. --prompt 'Once upon a time'")
    if args.max_new_tokens < 1:
        raise KilnConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    sampling.check()
    opened = open_checkpoint(args.checkpoint, args.overrides)
    config = opened.config
    check_generate_layout(config)
    tokenizer = load_tokenizer(config.data.tokenizer or bundled_tokenizer_path())

    def body(ctx) -> None:
        (model,), vocab_size = load_model(opened, ctx)
        if ctx.rank == 0:
            log.info(f"generating from {opened.step_dir} (step {opened.step}): temperature {sampling.temperature}, "
                     f"top-k {sampling.top_k or 'off'}, seed {sampling.seed}; no KV cache (each token recomputes "
                     f"the window of up to {config.model.seq_len} tokens)")
        result = generate(model, ctx, tokenizer, vocab_size, args.prompt, max_new_tokens=args.max_new_tokens,
                          sampling=sampling, seq_len=config.model.seq_len)
        if ctx.rank == 0:
            print(result.text, flush=True)
            log.info(f"{len(result.new_tokens)} new tokens" + (" (stopped at end of text)" if result.stopped_at_eos
                                                               else "")
                     + f", mean log-likelihood {result.mean_log_likelihood:.3f} nats/token "
                     f"(uniform over the vocabulary: {-math.log(vocab_size):.3f})")

    worker_args = ["generate", args.checkpoint, f"--prompt={args.prompt}", f"--max-new-tokens={args.max_new_tokens}",
                   f"--temperature={args.temperature}", f"--top-k={args.top_k}", f"--seed={args.seed}",
                   *args.overrides]
    return run_on_ranks(args, config, worker_args, body)


def add_generate_parser(sub) -> None:
    from kiln.inference.command import add_common_arguments

    p = sub.add_parser("generate", help="sample a continuation of a prompt from a checkpoint (no KV cache)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"stop after N new tokens (default {DEFAULT_MAX_NEW_TOKENS}), or earlier at end of text")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"softmax temperature; 0 is greedy (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"sample among the K most likely tokens; 0: all (default {DEFAULT_TOP_K})")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.set_defaults(handler=cmd_generate)
