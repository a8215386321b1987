"""`kiln data train-tokenizer`: byte-level BPE on the same inputs `kiln data prepare` reads.

The model is the one :func:`kiln.data.tokenizer.train_bpe_tokenizer` trains (byte-level BPE,
GPT-2 pre-tokenizer, ``<|endoftext|>`` as id 0); this adds the inputs of prepare (JSONL,
Parquet, text; directories and globs; Unicode normalisation as prepare applies it) and the FIM
sentinels as special tokens, so a FIM dataset can be made with the tokenizer it trains.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from kiln.data.prepare.config import PrepareConfig
from kiln.data.prepare.encode import FIM_TOKENS
from kiln.data.prepare.inputs import expand_inputs, plan_chunks, read_chunk
from kiln.data.prepare.text import normalize_unicode
from kiln.data.tokenizer import EOS_TOKEN
from kiln.errors import KilnDataError

log = logging.getLogger(__name__)


def iter_input_documents(inputs: list[str], cfg: PrepareConfig) -> Iterator[str]:
    """Every non-empty document of ``inputs``, normalised, in prepare's order."""
    for chunk in plan_chunks(expand_inputs(inputs), cfg.input):
        for doc in read_chunk(chunk, cfg.input):
            doc = normalize_unicode(doc, cfg.normalize.unicode)
            if doc.strip():
                yield doc


def train_tokenizer(inputs: list[str], vocab_size: int, out_dir: str, cfg: PrepareConfig | None = None, *,
                    fim_tokens: bool = True) -> str:
    """Train a byte-level BPE of ``vocab_size`` ids (special tokens included); return tokenizer.json's path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cfg = cfg or PrepareConfig()
    specials = [EOS_TOKEN, *(FIM_TOKENS if fim_tokens else ())]
    # 256 byte symbols + the special tokens must fit, or the trainer silently grows the vocab.
    if vocab_size < 256 + len(specials):
        raise KilnDataError(f"--vocab-size ({vocab_size}) must be at least {256 + len(specials)} "
                            f"(256 bytes + {len(specials)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    count = 0

    def docs() -> Iterator[str]:
        nonlocal count
        for doc in iter_input_documents(inputs, cfg):
            count += 1
            yield doc

    tok.train_from_iterator(docs(), trainer=trainer)
    if count == 0:
        raise KilnDataError(f"train-tokenizer: inputs {inputs} hold no non-empty document")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "tokenizer.json")
    tmp = f"{out}.tmp.{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out)
    log.info("trained byte-level BPE (vocab %d, specials %s) on %d documents -> %s", tok.get_vocab_size(),
             specials, count, out)
    return out
